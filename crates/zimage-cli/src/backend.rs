//! Choosing the burn backend and the float dtype at run time.

use anyhow::{bail, Result};
use burn::tensor::DType;
use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// The first that works of cuda, wgpu, ndarray.
    Auto,
    Cuda,
    Wgpu,
    Ndarray,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeChoice {
    F32,
    Bf16,
    F16,
}

impl DtypeChoice {
    pub fn dtype(self) -> DType {
        match self {
            DtypeChoice::F32 => DType::F32,
            DtypeChoice::Bf16 => DType::BF16,
            DtypeChoice::F16 => DType::F16,
        }
    }
}

/// The name users type for a dtype.
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "an unsupported dtype",
    }
}

/// A backend that is compiled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    #[cfg(feature = "cuda")]
    Cuda,
    #[cfg(feature = "wgpu")]
    Wgpu,
    #[cfg(feature = "ndarray")]
    Ndarray,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(feature = "cuda")]
            Backend::Cuda => "cuda",
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => "wgpu",
            #[cfg(feature = "ndarray")]
            Backend::Ndarray => "ndarray",
        }
    }

    /// The default dtype: bf16 where the backend computes in it, f32 elsewhere.
    pub fn default_dtype(self) -> DType {
        match self {
            #[cfg(feature = "cuda")]
            Backend::Cuda => DType::BF16,
            #[allow(unreachable_patterns)]
            _ => DType::F32,
        }
    }

    /// Which dtypes the backend computes in.
    pub fn check_dtype(self, dtype: DType) -> Result<()> {
        let supported: &[DType] = match self {
            #[cfg(feature = "cuda")]
            Backend::Cuda => &[DType::F32, DType::BF16, DType::F16],
            // burn-wgpu has no bf16 arithmetic.
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => &[DType::F32, DType::F16],
            #[cfg(feature = "ndarray")]
            Backend::Ndarray => &[DType::F32],
        };
        if !supported.contains(&dtype) {
            let names: Vec<&str> = supported.iter().map(|&d| dtype_name(d)).collect();
            bail!(
                "the {} backend does not compute in {} (it supports {})",
                self.name(),
                dtype_name(dtype),
                names.join(", ")
            );
        }
        Ok(())
    }
}

impl Backend {
    /// Which dtypes the backend can hold weight matrices in (the host kernels widen bf16 and
    /// f16 inside the product; cubecl backends hold what they compute in).
    pub fn check_weights_dtype(self, dtype: DType) -> Result<()> {
        match self {
            #[cfg(feature = "ndarray")]
            Backend::Ndarray => Ok(()),
            #[allow(unreachable_patterns)]
            _ => self.check_dtype(dtype),
        }
    }
}

/// Resolves the user's choice to a compiled-in backend whose device answers, and tells the
/// model code that device's limits.
pub fn resolve(choice: BackendChoice) -> Result<Backend> {
    let backend = pick(choice)?;
    backend.register_device_limits();
    Ok(backend)
}

impl Backend {
    /// Registers the default device's largest tensor with [`zimage_nn::device`], where the
    /// backend has such a limit: wgpu binds each tensor as one storage buffer, and past the
    /// adapter's binding size a kernel silently reads zeros.
    fn register_device_limits(self) {
        match self {
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => {
                use burn::backend::wgpu::{WgpuDevice, WgpuRuntime};
                use cubecl::Runtime;
                let device = WgpuDevice::default();
                let bytes = WgpuRuntime::client(&device)
                    .properties()
                    .memory
                    .max_page_size;
                zimage_nn::device::set_max_tensor_bytes::<burn::backend::Wgpu>(&device, bytes);
            }
            #[allow(unreachable_patterns)]
            _ => {}
        }
    }
}

fn pick(choice: BackendChoice) -> Result<Backend> {
    match choice {
        BackendChoice::Auto => {
            #[cfg(feature = "cuda")]
            if probe(Backend::Cuda).is_ok() {
                return Ok(Backend::Cuda);
            }
            #[cfg(feature = "wgpu")]
            if probe(Backend::Wgpu).is_ok() {
                return Ok(Backend::Wgpu);
            }
            #[cfg(feature = "ndarray")]
            return Ok(Backend::Ndarray);
            #[allow(unreachable_code)]
            {
                bail!("no backend is compiled in")
            }
        }
        BackendChoice::Cuda => {
            #[cfg(feature = "cuda")]
            return usable(Backend::Cuda);
            #[allow(unreachable_code)]
            {
                bail!("this zimage was built without the cuda backend (cargo feature `cuda`)")
            }
        }
        BackendChoice::Wgpu => {
            #[cfg(feature = "wgpu")]
            return usable(Backend::Wgpu);
            #[allow(unreachable_code)]
            {
                bail!("this zimage was built without the wgpu backend (cargo feature `wgpu`)")
            }
        }
        BackendChoice::Ndarray => {
            #[cfg(feature = "ndarray")]
            return Ok(Backend::Ndarray);
            #[allow(unreachable_code)]
            {
                bail!("this zimage was built without the ndarray backend (cargo feature `ndarray`)")
            }
        }
    }
}

/// The backend if its device answers, else why not.
#[allow(dead_code)]
fn usable(backend: Backend) -> Result<Backend> {
    match probe(backend) {
        Ok(()) => Ok(backend),
        Err(why) => {
            let hint = match backend.name() {
                "cuda" => "no NVIDIA driver (libcuda) or GPU answered",
                "wgpu" => "no Vulkan, Metal or DirectX 12 adapter answered",
                _ => "the device failed",
            };
            bail!(
                "the {} backend has no usable device: {hint} ({why})",
                backend.name()
            )
        }
    }
}

/// Whether a small computation succeeds on the backend's default device (drivers are loaded at
/// run time, so a build with the backend may run where it has no device).
#[allow(dead_code)]
fn probe(backend: Backend) -> std::result::Result<(), String> {
    let run = move || match backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda => tiny_op::<burn::backend::Cuda>(),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => tiny_op::<burn::backend::Wgpu>(),
        #[cfg(feature = "ndarray")]
        Backend::Ndarray => tiny_op::<burn::backend::NdArray>(),
    };
    // The backends report a missing driver or adapter by panicking (on their device thread,
    // re-raised here); keep the message, not the backtrace.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(run);
    std::panic::set_hook(hook);
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err("a test computation gave a wrong result".into()),
        Err(payload) => {
            let text = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the driver failed to start".into());
            Err(text
                .lines()
                .next()
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect())
        }
    }
}

#[allow(dead_code)]
fn tiny_op<B: burn::tensor::backend::Backend>() -> bool {
    let device = B::Device::default();
    let x = burn::tensor::Tensor::<B, 1>::ones([4], &device);
    let sum: f32 = x
        .sum()
        .into_data()
        .to_vec::<f32>()
        .map(|v| v[0])
        .unwrap_or(0.0);
    sum == 4.0
}

/// Runs `$body` with `$B` bound to the concrete burn backend of `$backend`.
#[macro_export]
macro_rules! with_backend {
    ($backend:expr, |$B:ident| $body:expr) => {
        match $backend {
            #[cfg(feature = "cuda")]
            $crate::backend::Backend::Cuda => {
                type $B = burn::backend::Cuda;
                $body
            }
            #[cfg(feature = "wgpu")]
            $crate::backend::Backend::Wgpu => {
                type $B = burn::backend::Wgpu;
                $body
            }
            #[cfg(feature = "ndarray")]
            $crate::backend::Backend::Ndarray => {
                type $B = burn::backend::NdArray;
                $body
            }
        }
    };
}
