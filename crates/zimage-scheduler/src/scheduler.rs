use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use num_traits::Float;

use crate::{FlowMatchEulerDiscreteSchedulerConfig, SchedulerError, TimeShiftType};

/// Euler sampling of a flow-matching ODE over a sigma schedule (1 = noise, 0 = data).
#[derive(Debug, Clone)]
pub struct FlowMatchEulerDiscreteScheduler {
    config: FlowMatchEulerDiscreteSchedulerConfig,
    /// `N + 1` values, the terminal one appended.
    sigmas: Vec<f32>,
    /// `sigma * num_train_timesteps`, `N` values.
    timesteps: Vec<f32>,
    begin_index: usize,
    step_index: Option<usize>,
    /// Ends of the training schedule, used when no sigmas are given.
    sigma_min: f64,
    sigma_max: f64,
}

/// `torch.linspace(start, end, steps)` in float32 on the CPU, scalar path: the first half counts
/// up from `start`, the second half down from `end`.
pub fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// Z-Image's default schedule before shifting: `torch.linspace(1, 1/N, N)`.
pub fn z_image_sigmas(num_inference_steps: usize) -> Vec<f32> {
    torch_linspace_f32(1.0, 1.0 / num_inference_steps as f32, num_inference_steps)
}

/// `mu` for dynamic shifting: linear in the image token count (diffusers' `calculate_shift`).
pub fn calculate_shift(
    image_seq_len: usize,
    config: &FlowMatchEulerDiscreteSchedulerConfig,
) -> f64 {
    let m = (config.max_shift - config.base_shift)
        / (config.max_image_seq_len as f64 - config.base_image_seq_len as f64);
    let b = config.base_shift - m * config.base_image_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// `numpy.linspace(start, stop, num)` in float64.
fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    y[num - 1] = stop;
    y
}

impl FlowMatchEulerDiscreteScheduler {
    pub fn new(config: FlowMatchEulerDiscreteSchedulerConfig) -> Result<Self, SchedulerError> {
        config.validate()?;
        // The training schedule, as `__init__` builds it in float32.
        let t = config.num_train_timesteps;
        let first = 1.0f32; // sigmas run from T/T down to 1/T
        let last = 1.0f32 / t as f32;
        let (sigma_max, sigma_min) = if config.use_dynamic_shifting {
            (first, last)
        } else {
            let shift = config.shift as f32;
            let shift_minus_one = (config.shift - 1.0) as f32;
            let apply = |s: f32| shift * s / (1.0 + shift_minus_one * s);
            (apply(first), apply(last))
        };
        Ok(Self {
            config,
            sigmas: Vec::new(),
            timesteps: Vec::new(),
            begin_index: 0,
            step_index: None,
            sigma_min: sigma_min as f64,
            sigma_max: sigma_max as f64,
        })
    }

    pub fn config(&self) -> &FlowMatchEulerDiscreteSchedulerConfig {
        &self.config
    }

    /// Sets the schedule, as `set_timesteps(num_inference_steps, sigmas=..., mu=...)`.
    /// With `sigmas`, `num_inference_steps` may be `None` (it is their count).
    pub fn set_timesteps(
        &mut self,
        num_inference_steps: Option<usize>,
        sigmas: Option<&[f32]>,
        mu: Option<f64>,
    ) -> Result<(), SchedulerError> {
        let config = &self.config;
        if config.use_dynamic_shifting && mu.is_none() {
            return Err(SchedulerError::Schedule(
                "mu is required when use_dynamic_shifting is set".into(),
            ));
        }
        let steps = match (num_inference_steps, sigmas) {
            (Some(n), Some(s)) if s.len() != n => {
                return Err(SchedulerError::Schedule(format!(
                    "{} sigmas given for {n} inference steps",
                    s.len()
                )))
            }
            (Some(n), _) => n,
            (None, Some(s)) => s.len(),
            (None, None) => {
                return Err(SchedulerError::Schedule(
                    "give the number of steps or the sigmas".into(),
                ))
            }
        };
        if steps == 0 {
            return Err(SchedulerError::Schedule(
                "the schedule needs at least one step".into(),
            ));
        }
        // numpy keeps the dtype of what it is given: float32 for custom sigmas, float64 for the
        // linspace of the default path; shifting then runs in that dtype.
        let shifted: Vec<f64> = match sigmas {
            Some(s) => self
                .shift(s.to_vec(), mu)?
                .into_iter()
                .map(f64::from)
                .collect(),
            None => {
                let t = config.num_train_timesteps as f64;
                let timesteps = numpy_linspace(self.sigma_max * t, self.sigma_min * t, steps);
                self.shift(timesteps.into_iter().map(|x| x / t).collect(), mu)?
            }
        };
        let shifted = self.convert(shifted, steps);
        let t = config.num_train_timesteps as f32;
        let mut sigmas: Vec<f32> = shifted.into_iter().map(|s| s as f32).collect();
        let terminal = if config.invert_sigmas {
            sigmas.iter_mut().for_each(|s| *s = 1.0 - *s);
            1.0
        } else {
            0.0
        };
        self.timesteps = sigmas.iter().map(|s| s * t).collect();
        sigmas.push(terminal);
        self.sigmas = sigmas;
        self.step_index = None;
        self.begin_index = 0;
        Ok(())
    }

    /// Static or dynamic shift, then the optional stretch to `shift_terminal`, in `F`.
    fn shift<F: Float>(&self, sigmas: Vec<F>, mu: Option<f64>) -> Result<Vec<F>, SchedulerError> {
        let config = &self.config;
        let f = |x: f64| F::from(x).unwrap_or_else(F::nan);
        let one = F::one();
        let mut out: Vec<F> = if config.use_dynamic_shifting {
            let mu = mu.unwrap_or_default();
            // `(1 / t - 1) ** sigma` with sigma = 1.
            match config.time_shift_type {
                TimeShiftType::Exponential => {
                    let e = f(mu.exp());
                    sigmas.iter().map(|&t| e / (e + (one / t - one))).collect()
                }
                TimeShiftType::Linear => {
                    let m = f(mu);
                    sigmas.iter().map(|&t| m / (m + (one / t - one))).collect()
                }
            }
        } else {
            let shift = f(config.shift);
            let shift_minus_one = f(config.shift - 1.0);
            sigmas
                .iter()
                .map(|&s| shift * s / (one + shift_minus_one * s))
                .collect()
        };
        if let Some(terminal) = config.shift_terminal.filter(|&t| t != 0.0) {
            let last = one - *out.last().unwrap_or(&one);
            let scale = last / f(1.0 - terminal);
            out.iter_mut().for_each(|s| *s = one - ((one - *s) / scale));
        }
        if out.iter().any(|s| !s.is_finite()) {
            return Err(SchedulerError::Schedule(
                "the schedule has non-finite sigmas (a sigma of 0 with dynamic shifting?)".into(),
            ));
        }
        Ok(out)
    }

    /// Karras or exponential spacing between the ends of the shifted schedule (float64).
    fn convert(&self, sigmas: Vec<f64>, steps: usize) -> Vec<f64> {
        let (Some(&max), Some(&min)) = (sigmas.first(), sigmas.last()) else {
            return sigmas;
        };
        if self.config.use_karras_sigmas {
            let rho = 7.0;
            let (min_inv, max_inv) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
            numpy_linspace(0.0, 1.0, steps)
                .into_iter()
                .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
                .collect()
        } else if self.config.use_exponential_sigmas {
            numpy_linspace(max.ln(), min.ln(), steps)
                .into_iter()
                .map(f64::exp)
                .collect()
        } else {
            sigmas
        }
    }

    /// Sigmas of the schedule, the terminal one included (`N + 1` values).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `sigma * num_train_timesteps` for each step (`N` values).
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// Starts stepping at `index` (image-to-image skips the first steps).
    pub fn set_begin_index(&mut self, index: usize) {
        self.begin_index = index;
    }

    pub fn begin_index(&self) -> usize {
        self.begin_index
    }

    /// The index of the next step.
    pub fn step_index(&self) -> usize {
        self.step_index.unwrap_or(self.begin_index)
    }

    /// One Euler step: `sample + (sigma_next - sigma) * model_output`, in f32.
    /// `model_output` is the velocity `noise - x0`.
    pub fn step<B: Backend, const D: usize>(
        &mut self,
        model_output: Tensor<B, D>,
        sample: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, SchedulerError> {
        let index = self.step_index();
        if index + 1 >= self.sigmas.len() {
            return Err(SchedulerError::Schedule(format!(
                "step {index} is past the end of a {}-step schedule",
                self.timesteps.len()
            )));
        }
        let dt = self.sigmas[index + 1] - self.sigmas[index];
        let out = sample.cast(DType::F32) + model_output.cast(DType::F32).mul_scalar(dt);
        self.step_index = Some(index + 1);
        Ok(out)
    }

    /// The forward process `sigma * noise + (1 - sigma) * sample` at the current step (the begin
    /// index before stepping), computed in `sample`'s dtype as diffusers does.
    pub fn scale_noise<B: Backend, const D: usize>(
        &self,
        sample: Tensor<B, D>,
        noise: Tensor<B, D>,
    ) -> Tensor<B, D> {
        self.scale_noise_at(self.step_index(), sample, noise)
    }

    /// [`Self::scale_noise`] at the sigma of step `index`.
    pub fn scale_noise_at<B: Backend, const D: usize>(
        &self,
        index: usize,
        sample: Tensor<B, D>,
        noise: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let dtype = sample.dtype();
        let sigma = round_to(self.sigmas.get(index).copied().unwrap_or(0.0), dtype);
        let keep = round_to(1.0 - sigma, dtype);
        noise.cast(dtype).mul_scalar(sigma) + sample.mul_scalar(keep)
    }
}

/// Rounds a scalar to what a tensor of `dtype` holds (diffusers moves sigmas to the sample's dtype).
fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}
