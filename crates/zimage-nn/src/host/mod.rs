//! Host kernels: matrix products whose operands may be stored in another precision
//! ([`gemm`], [`HostMatrix`]), fused row kernels ([`kernels`]), blocked attention and im2col
//! convolution. Plain Rust on f32 buffers, with no tie to a burn backend.
//!
//! With the `ndarray` feature they implement [`crate::ZBackend`] for burn-ndarray, where burn's
//! own ops are slow: every element-wise pass there is a separate allocation, `reshape` copies,
//! exp is libm's scalar `expf`, and matrixmultiply starts threads of its own inside rayon's.
//! Tensors reach the host without copies where burn-ndarray allows it: a uniquely owned,
//! contiguous f32 tensor hands over its buffer, a shared one (a parameter) is borrowed, and
//! results go back as owned buffers.

mod attention;
mod conv;
pub mod gemm;
pub mod kernels;
mod matrix;
#[cfg(feature = "ndarray")]
mod ndarray;

use std::cell::Cell;

pub use attention::{attention, AttentionShape};
pub use conv::{conv2d, ConvShape};
pub use matrix::{HostFormat, HostMatrix};

thread_local! {
    /// Whether the host kernels are switched off on this thread (`None`: the process default).
    static DISABLED: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Whether backends with host kernels use them on this thread: yes, unless switched off by
/// [`without_host_kernels`] or for the process by `ZIMAGE_HOST_KERNELS=0`.
pub fn enabled() -> bool {
    static DEFAULT_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let default_off = *DEFAULT_OFF.get_or_init(|| {
        std::env::var("ZIMAGE_HOST_KERNELS")
            .map(|v| matches!(v.as_str(), "0" | "off" | "false" | "no"))
            .unwrap_or(false)
    });
    !DISABLED.with(Cell::get).unwrap_or(default_off)
}

/// Runs `f` with the host kernels off on this thread: models loaded and run inside `f` take the
/// generic path ([`crate::generic`], what GPUs run) on every backend, burn-ndarray included.
pub fn without_host_kernels<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(Option<bool>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DISABLED.with(|d| d.set(self.0));
        }
    }
    let _restore = Restore(DISABLED.with(|d| d.replace(Some(true))));
    f()
}
