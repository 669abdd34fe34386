//! Kernels run on the host for burn-ndarray, where burn's own are slow: every element-wise pass
//! there is a separate allocation, `reshape` copies, exp is libm's scalar `expf`, and the matrix
//! product (matrixmultiply) starts threads of its own inside rayon's. The layers call these when
//! [`is_host_backend`] says so; the generic code beside them stays the reference.
//!
//! Tensors reach the host without copies where burn-ndarray allows it: a uniquely owned,
//! contiguous f32 tensor hands over its buffer ([`host_f32`]), a shared one (a parameter) is
//! borrowed ([`with_f32`]), and results go back as owned buffers ([`from_f32`]).

mod conv;
pub mod gemm;
pub mod kernels;

use std::any::Any;

use burn::backend::ndarray::NdArrayTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

pub use conv::conv2d;

/// Whether `device` is burn-ndarray's, so the host kernels beat the backend's own.
pub fn is_host_backend<B: Backend>(device: &B::Device) -> bool {
    B::name(device).starts_with("ndarray")
}

/// The values of `t` as f32, row-major: the tensor's own buffer when it is burn-ndarray's f32,
/// contiguous and not shared; one copy otherwise.
pub fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    let n = t.shape().num_elements();
    let primitive = match t.cast(DType::F32).into_primitive() {
        TensorPrimitive::Float(p) => {
            let any: Box<dyn Any> = Box::new(p);
            match any.downcast::<NdArrayTensor>().map(|t| *t) {
                Ok(NdArrayTensor::F32(storage)) => {
                    // burn-ndarray's own `into_data` copies shared, borrowed and some contiguous
                    // buffers element by element; a slice copy or no copy at all is the point.
                    if !storage.is_unique() {
                        if let Some(values) = storage.view().as_slice() {
                            return values.to_vec();
                        }
                    }
                    let array = storage.into_owned();
                    if let Some(values) = array.as_slice() {
                        if values.len() == n && array.is_unique() {
                            let (mut vec, offset) = array.into_owned().into_raw_vec_and_offset();
                            vec.drain(..offset.unwrap_or(0));
                            vec.truncate(n);
                            return vec;
                        }
                        return values.to_vec();
                    }
                    return array.iter().copied().collect();
                }
                Ok(other) => TensorPrimitive::Float(back::<B>(Box::new(other))),
                Err(any) => TensorPrimitive::Float(back::<B>(any)),
            }
        }
        quantized => quantized,
    };
    Tensor::<B, D>::from_primitive(primitive)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default()
}

/// A primitive taken apart by [`host_f32`], put back.
fn back<B: Backend>(any: Box<dyn Any>) -> B::FloatTensorPrimitive {
    match any.downcast::<B::FloatTensorPrimitive>() {
        Ok(p) => *p,
        Err(_) => unreachable!("the value came out of a B::FloatTensorPrimitive"),
    }
}

/// burn-ndarray's tensor behind a primitive, when the backend is burn-ndarray.
fn ndarray_tensor<B: Backend>(primitive: &TensorPrimitive<B>) -> Option<&NdArrayTensor> {
    match primitive {
        TensorPrimitive::Float(p) => (p as &dyn Any).downcast_ref::<NdArrayTensor>(),
        _ => None,
    }
}

/// Runs `f` on the values of `t` as f32, row-major: borrowed in place when `t` is burn-ndarray's
/// contiguous f32 (parameters, shared activations), copied otherwise.
pub fn with_f32<B: Backend, const D: usize, R>(t: &Tensor<B, D>, f: impl FnOnce(&[f32]) -> R) -> R {
    let primitive = t.clone().into_primitive();
    if let Some(NdArrayTensor::F32(storage)) = ndarray_tensor::<B>(&primitive) {
        if let Some(values) = storage.view().as_slice() {
            return f(values);
        }
    }
    f(&host_f32(t.clone()))
}

/// `t.reshape(shape)`; on burn-ndarray without the copy its own reshape always makes.
pub fn reshape<B: Backend, const D1: usize, const D2: usize>(
    t: Tensor<B, D1>,
    shape: [usize; D2],
) -> Tensor<B, D2> {
    if !is_host_backend::<B>(&t.device()) || t.dtype() != DType::F32 {
        return t.reshape(shape);
    }
    assert_eq!(
        t.shape().num_elements(),
        shape.iter().product::<usize>(),
        "reshape {:?} to {shape:?}",
        t.dims()
    );
    let device = t.device();
    from_f32(host_f32(t), shape, &device, DType::F32)
}

/// A host buffer back as a tensor of `dtype` (no copy when `dtype` is f32).
pub fn from_f32<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, D> {
    Tensor::<B, D>::from_data(TensorData::new(values, shape), (device, DType::F32)).cast(dtype)
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    use super::*;

    type B = NdArray<f32>;

    /// Borrowed views see the logical values of strided and shared tensors, not their storage.
    #[test]
    fn host_views_follow_the_logical_layout() {
        let device = Default::default();
        let t = Tensor::<B, 2>::random([3, 5], Distribution::Normal(0.0, 1.0), &device);
        let expected = t.to_data().into_vec::<f32>().unwrap();
        let shared = t.clone();
        assert_eq!(with_f32(&shared, |v| v.to_vec()), expected);
        let transposed = t.clone().transpose();
        let expected_t = transposed.to_data().into_vec::<f32>().unwrap();
        assert_eq!(with_f32(&transposed, |v| v.to_vec()), expected_t);
        assert_eq!(host_f32(transposed), expected_t);
        let back: Tensor<B, 2> = from_f32(expected.clone(), [3, 5], &device, DType::F32);
        assert_eq!(back.into_data().into_vec::<f32>().unwrap(), expected);
    }
}
