//! The flow-matching Euler scheduler Z-Image samples with (`FlowMatchEulerDiscreteScheduler` in
//! diffusers 0.42.1), including Z-Image's default sigma schedule.
//!
//! Tables are computed on the host with the same float widths diffusers uses (f32 for sigmas and
//! timesteps, f64 where numpy or Python floats are involved), so they agree bit for bit or within
//! an ulp.

mod config;
mod scheduler;

pub use config::{FlowMatchEulerDiscreteSchedulerConfig, TimeShiftType};
pub use scheduler::{
    calculate_shift, torch_linspace_f32, z_image_sigmas, FlowMatchEulerDiscreteScheduler,
};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid scheduler config{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        path: Option<PathBuf>,
        reason: String,
    },
    #[error("{0}")]
    Schedule(String),
}
