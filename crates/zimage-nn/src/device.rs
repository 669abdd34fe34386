//! What generic model code must know about a device that burn's `Backend` trait does not say:
//! the largest tensor one allocation can hold.
//!
//! wgpu binds every tensor as one storage buffer, and a kernel that reads past the adapter's
//! `max_storage_buffer_binding_size` (128 MiB on Mesa's lavapipe) silently reads zeros. The
//! caller that knows the concrete backend (the command, a test) registers the limit once; the
//! loaders and forward passes check their tensors against it and fail with an error that names the
//! tensor instead of computing on zeros. Devices without a registered limit are unlimited.

use std::any::TypeId;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};

use burn::tensor::backend::Backend;
use burn::tensor::DType;

type Key = (TypeId, String);

fn limits() -> &'static Mutex<HashMap<Key, u64>> {
    static LIMITS: OnceLock<Mutex<HashMap<Key, u64>>> = OnceLock::new();
    LIMITS.get_or_init(Default::default)
}

fn key<B: Backend>(device: &B::Device) -> Key {
    (TypeId::of::<B>(), format!("{device:?}"))
}

/// Registers the largest tensor, in bytes, that `device` of backend `B` can hold.
pub fn set_max_tensor_bytes<B: Backend>(device: &B::Device, bytes: u64) {
    limits()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key::<B>(device), bytes);
}

/// Removes the limit registered for `device` of backend `B`.
pub fn clear_max_tensor_bytes<B: Backend>(device: &B::Device) {
    limits()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key::<B>(device));
}

/// The registered limit of `device`, if any.
pub fn max_tensor_bytes<B: Backend>(device: &B::Device) -> Option<u64> {
    limits()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key::<B>(device))
        .copied()
}

/// Bytes of a tensor of `shape` in `dtype`.
pub fn tensor_bytes(shape: &[usize], dtype: DType) -> u64 {
    shape.iter().map(|&d| d as u64).product::<u64>() * dtype.size() as u64
}

/// A tensor larger than the device takes in one allocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} ({shape:?}, {}) is larger than the {device} device takes in one tensor ({}); \
     use another backend, a smaller image, or VAE tiling",
    Bytes(*bytes),
    Bytes(*limit)
)]
pub struct TooLarge {
    pub what: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
    pub limit: u64,
    pub device: String,
}

/// Whether a tensor of `shape` in `dtype` fits `device`; `what` names it in the error.
pub fn check_fits<B: Backend>(
    device: &B::Device,
    what: impl FnOnce() -> String,
    shape: &[usize],
    dtype: DType,
) -> Result<(), TooLarge> {
    let Some(limit) = max_tensor_bytes::<B>(device) else {
        return Ok(());
    };
    let bytes = tensor_bytes(shape, dtype);
    if bytes <= limit {
        return Ok(());
    }
    Err(TooLarge {
        what: what(),
        shape: shape.to_vec(),
        bytes,
        limit,
        device: format!("{device:?}"),
    })
}

/// Sizes people read: 128 MiB, 1.5 GiB, 48 KiB.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        const K: f64 = 1024.0;
        if b >= K * K * K {
            write!(f, "{:.1} GiB", b / (K * K * K))
        } else if b >= K * K {
            write!(f, "{:.0} MiB", b / (K * K))
        } else if b >= K {
            write!(f, "{:.0} KiB", b / K)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;

    #[test]
    fn limits_are_per_backend_and_device() {
        // A backend type no other test uses (i32 indices): the limit is process-wide.
        type B = NdArray<f32, i32>;
        let device = Default::default();
        // Unregistered: anything fits.
        assert!(check_fits::<NdArray<f64>>(&device, || "x".into(), &[1 << 20], DType::F32).is_ok());
        set_max_tensor_bytes::<B>(&device, 128 << 20);
        assert_eq!(max_tensor_bytes::<B>(&device), Some(128 << 20));
        assert!(check_fits::<B>(&device, || "x".into(), &[32 << 20], DType::F32).is_ok());
        let err = check_fits::<B>(&device, || "layers.0.w1".into(), &[32 << 20, 2], DType::F32)
            .unwrap_err();
        assert_eq!(err.bytes, 256 << 20);
        let text = err.to_string();
        assert!(
            text.contains("layers.0.w1") && text.contains("256 MiB") && text.contains("128 MiB"),
            "{text}"
        );
        // Another backend type on the same device string is not affected.
        assert_eq!(max_tensor_bytes::<NdArray<f64>>(&device), None);
        clear_max_tensor_bytes::<B>(&device);
        assert_eq!(max_tensor_bytes::<B>(&device), None);
    }
}
