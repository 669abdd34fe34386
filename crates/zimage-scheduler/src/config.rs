use std::path::Path;

use serde::Deserialize;

use crate::SchedulerError;

/// How `mu` shifts sigmas when dynamic shifting is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TimeShiftType {
    #[default]
    Exponential,
    Linear,
}

/// `scheduler/scheduler_config.json`; absent fields take diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FlowMatchEulerDiscreteSchedulerConfig {
    pub num_train_timesteps: usize,
    /// Static shift (Z-Image-Turbo: 3.0).
    pub shift: f64,
    /// Resolution-dependent shift from `mu` instead of `shift`.
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub invert_sigmas: bool,
    /// Stretch the shifted schedule so that it ends at this value.
    pub shift_terminal: Option<f64>,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub time_shift_type: TimeShiftType,
    pub stochastic_sampling: bool,
}

impl Default for FlowMatchEulerDiscreteSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
            invert_sigmas: false,
            shift_terminal: None,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            time_shift_type: TimeShiftType::Exponential,
            stochastic_sampling: false,
        }
    }
}

impl FlowMatchEulerDiscreteSchedulerConfig {
    /// The published Z-Image-Turbo scheduler (static shift 3).
    pub fn z_image_turbo() -> Self {
        Self {
            shift: 3.0,
            ..Self::default()
        }
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SchedulerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            SchedulerError::Config { reason, .. } => SchedulerError::Config {
                path: Some(path.to_path_buf()),
                reason,
            },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self, SchedulerError> {
        let config: Self = serde_json::from_str(text).map_err(|e| SchedulerError::Config {
            path: None,
            reason: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), SchedulerError> {
        let fail = |reason: &str| {
            Err(SchedulerError::Config {
                path: None,
                reason: reason.to_string(),
            })
        };
        if self.num_train_timesteps == 0 {
            return fail("num_train_timesteps must be positive");
        }
        let conversions = [
            self.use_karras_sigmas,
            self.use_exponential_sigmas,
            self.use_beta_sigmas,
        ];
        if conversions.iter().filter(|&&on| on).count() > 1 {
            return fail(
                "only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set",
            );
        }
        // Beta sigmas need the inverse CDF of the beta distribution (scipy in diffusers) and
        // stochastic sampling needs noise at every step; no Z-Image release uses either.
        if self.use_beta_sigmas {
            return fail("use_beta_sigmas is not supported");
        }
        if self.stochastic_sampling {
            return fail("stochastic_sampling is not supported");
        }
        if self.shift_terminal == Some(1.0) {
            return fail("shift_terminal must differ from 1");
        }
        Ok(())
    }
}
