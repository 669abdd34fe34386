//! [`ZBackend`] for burn-ndarray: the layers run on the host kernels, weight matrices are held as
//! [`HostMatrix`]es. Each method falls back to the generic path when the host kernels are
//! switched off ([`super::without_host_kernels`]) or the weight is a device tensor.

use burn::backend::ndarray::{
    FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray,
};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Tensor, TensorPrimitive};

use super::gemm::{self, MatRef, Operand, RowSource, Threads};
use super::{attention::AttentionShape, conv::ConvShape, kernels};
use crate::ZBackend;
use crate::{generic, Conv2d, Embedding, GroupNorm, Linear, RmsNorm, Rotary, RotaryLayout, Stored};

/// A backend whose float tensors are burn-ndarray's.
trait Host: Backend<FloatTensorPrimitive = NdArrayTensor> {}
impl<B: Backend<FloatTensorPrimitive = NdArrayTensor>> Host for B {}

/// The values of `t` as f32, row-major: the tensor's own buffer when it is f32, contiguous and
/// not shared; one copy otherwise.
fn take_f32<B: Host, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    let n = t.shape().num_elements();
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        t.cast(DType::F32)
    };
    match t.into_primitive() {
        TensorPrimitive::Float(NdArrayTensor::F32(storage)) => {
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
            array.iter().copied().collect()
        }
        other => Tensor::<B, D>::from_primitive(other)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default(),
    }
}

/// Runs `f` on the values of `t` as f32, row-major: borrowed in place when `t` is contiguous f32
/// (parameters, shared activations), copied otherwise.
fn with_f32<B: Host, const D: usize, R>(t: &Tensor<B, D>, f: impl FnOnce(&[f32]) -> R) -> R {
    if let TensorPrimitive::Float(NdArrayTensor::F32(storage)) = t.clone().into_primitive() {
        if let Some(values) = storage.view().as_slice() {
            return f(values);
        }
    }
    f(&take_f32(t.clone()))
}

/// A host buffer back as a tensor of `dtype`, without a copy when `dtype` is f32.
fn give_f32<B: Host, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    dtype: DType,
) -> Tensor<B, D> {
    let array = SharedArray::<f32>::from_shape_vec(shape.to_vec(), values)
        .expect("the buffer holds the shape's elements");
    let t = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(NdArrayTensor::from(array)));
    if dtype == DType::F32 {
        t
    } else {
        t.cast(dtype)
    }
}

/// The weight of a layer as a product operand, on the f32 buffer `f` gets when it is a tensor.
fn with_operand<B: Host, const D: usize, R>(
    weight: &Stored<B, D>,
    f: impl FnOnce(Operand<'_>) -> R,
) -> R {
    match weight {
        Stored::Host(m) => f(Operand::Rows(m)),
        Stored::Device(t) => with_f32(t, |values| {
            f(Operand::Strided(MatRef::row_major(values, t.dims()[D - 1])))
        }),
        Stored::Quantized(q) => {
            let t = q.dequantize(DType::F32);
            with_f32(&t, |values| {
                f(Operand::Strided(MatRef::row_major(values, q.cols())))
            })
        }
    }
}

impl<E, I, Q> ZBackend for NdArray<E, I, Q>
where
    E: FloatNdArrayElement,
    I: IntNdArrayElement,
    Q: QuantElement,
    NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>>,
{
    fn host_kernels(_device: &Self::Device) -> bool {
        super::enabled()
    }

    fn project<const D: usize>(layer: &Linear<Self>, x: Tensor<Self, D>) -> Tensor<Self, D> {
        let Stored::Host(weight) = &layer.weight else {
            return generic::linear(layer, x);
        };
        if !super::enabled() {
            return generic::linear(layer, x);
        }
        let mut dims = x.dims();
        let (k, n) = (layer.in_features(), layer.out_features());
        let rows = dims[..D - 1].iter().product::<usize>();
        dims[D - 1] = n;
        let dtype = x.dtype();
        // The bias is the accumulator's start.
        let mut y = match &layer.bias {
            Some(bias) => with_f32(bias, |b| b.repeat(rows)),
            None => vec![0f32; rows * n],
        };
        with_f32(&x, |x| {
            // SAFETY: x is `rows x k`, the weight `n` rows of `k`, y `rows x n`, all dense.
            unsafe {
                gemm::gemm(
                    rows,
                    k,
                    n,
                    Operand::Strided(MatRef::row_major(x, k)),
                    Operand::Rows(weight),
                    y.as_mut_ptr(),
                    n,
                    layer.bias.is_some(),
                    Threads::Rayon,
                )
            }
        });
        give_f32(y, dims, dtype)
    }

    fn embed(layer: &Embedding<Self>, ids: &[u32]) -> Tensor<Self, 2> {
        let Stored::Host(table) = &layer.table else {
            return generic::embedding(layer, ids);
        };
        if !super::enabled() {
            return generic::embedding(layer, ids);
        }
        let dim = layer.dim();
        let mut out = vec![0f32; ids.len() * dim];
        for (row, &id) in out.chunks_mut(dim).zip(ids) {
            table.read_row(id as usize, 0, row);
        }
        give_f32(out, [ids.len(), dim], layer.dtype())
    }

    fn rms_norm<const D: usize>(layer: &RmsNorm<Self>, x: Tensor<Self, D>) -> Tensor<Self, D> {
        if !super::enabled() {
            return generic::rms_norm(layer, x);
        }
        let (dtype, dims) = (x.dtype(), x.dims());
        let y = with_f32(&x, |x| {
            with_f32(&layer.weight, |w| {
                kernels::rms_norm(x, w, layer.eps as f32, None)
            })
        });
        give_f32(y, dims, dtype)
    }

    fn rms_norm_scaled(
        layer: &RmsNorm<Self>,
        x: Tensor<Self, 3>,
        multiplier: &Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        if !super::enabled() {
            return generic::rms_norm_scaled(layer, x, multiplier);
        }
        let (dtype, dims) = (x.dtype(), x.dims());
        let y = with_f32(&x, |x| {
            with_f32(&layer.weight, |w| {
                with_f32(multiplier, |m| {
                    kernels::rms_norm(x, w, layer.eps as f32, Some((m, dims[1])))
                })
            })
        });
        give_f32(y, dims, dtype)
    }

    fn add_rms_norm(
        layer: &RmsNorm<Self>,
        residual: Tensor<Self, 3>,
        y: Tensor<Self, 3>,
        multiplier: Option<&Tensor<Self, 2>>,
    ) -> Tensor<Self, 3> {
        if !super::enabled() {
            return generic::add_rms_norm(layer, residual, y, multiplier);
        }
        let (dtype, dims) = (residual.dtype(), residual.dims());
        let eps = layer.eps as f32;
        // The residual's buffer is reused.
        let mut out = take_f32(residual);
        with_f32(&y, |y| {
            with_f32(&layer.weight, |w| match multiplier {
                Some(m) => with_f32(m, |m| {
                    kernels::add_rms_norm(&mut out, y, w, eps, Some((m, dims[1])))
                }),
                None => kernels::add_rms_norm(&mut out, y, w, eps, None),
            })
        });
        give_f32(out, dims, dtype)
    }

    fn silu_mul<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> Tensor<Self, D> {
        if !super::enabled() {
            return generic::silu_mul(a, b);
        }
        let (dtype, dims) = (a.dtype(), a.dims());
        let mut out = take_f32(a);
        with_f32(&b, |b| kernels::silu_mul(&mut out, b));
        give_f32(out, dims, dtype)
    }

    /// burn-ndarray's attention materialises the whole score tensor and runs its element-wise
    /// passes on one thread; the host one keeps a block of scores in cache.
    fn attend(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        key_valid: Option<&Tensor<Self, 2, Bool>>,
        causal: bool,
    ) -> Tensor<Self, 4> {
        if !super::enabled() {
            return generic::attention(q, k, v, key_valid, causal);
        }
        let dtype = q.dtype();
        let [batch, heads, queries, head_dim] = q.dims();
        let [_, kv_heads, keys, _] = k.dims();
        let valid: Option<Vec<bool>> =
            key_valid.map(|m| m.clone().into_data().into_vec::<bool>().unwrap_or_default());
        // The callers' `[batch, heads, tokens, d]` are views of tokens-major projections: swapped
        // back, the host copies are plain memory copies.
        let tokens_major = |t: Tensor<Self, 4>| take_f32(t.swap_dims(1, 2));
        let out = super::attention(
            &tokens_major(q),
            &tokens_major(k),
            &tokens_major(v),
            AttentionShape {
                batch,
                heads,
                kv_heads,
                queries,
                keys,
                head_dim,
            },
            valid.as_deref(),
            causal,
        );
        give_f32::<Self, 4>(out, [batch, queries, heads, head_dim], dtype).swap_dims(1, 2)
    }

    fn convolve(layer: &Conv2d<Self>, x: Tensor<Self, 4>) -> Tensor<Self, 4> {
        if !super::enabled() {
            return generic::conv2d(layer, x);
        }
        let dtype = x.dtype();
        let [batch, in_channels, height, width] = x.dims();
        let shape = ConvShape {
            batch,
            in_channels,
            height,
            width,
            out_channels: layer.out_channels(),
            kernel: layer.kernel(),
            stride: layer.stride(),
            padding: layer.padding(),
        };
        let [ho, wo] = shape.output();
        let x = take_f32(x);
        let out = with_f32(&layer.bias, |bias| {
            with_operand(&layer.weight, |weight| {
                super::conv2d(&x, shape, weight, bias)
            })
        });
        give_f32(out, [batch, layer.out_channels(), ho, wo], dtype)
    }

    /// In place in `x`'s buffer when burn-ndarray hands it over (a full-resolution feature map is
    /// the decoder's largest tensor).
    fn group_norm(layer: &GroupNorm<Self>, x: Tensor<Self, 4>, silu: bool) -> Tensor<Self, 4> {
        if !super::enabled() {
            return generic::group_norm(layer, x, silu);
        }
        let (dtype, dims) = (x.dtype(), x.dims());
        let [_, channels, height, width] = dims;
        let mut values = take_f32(x);
        with_f32(&layer.weight, |gamma| {
            with_f32(&layer.bias, |beta| {
                kernels::group_norm(
                    &mut values,
                    [channels, height * width],
                    layer.groups,
                    [gamma, beta],
                    layer.eps as f32,
                    silu,
                )
            })
        });
        give_f32(values, dims, dtype)
    }

    /// On the device the rotation's strided slices and concatenation cost more than the
    /// attention's products.
    fn rotate(rotary: &Rotary<Self>, x: Tensor<Self, 4>) -> Tensor<Self, 4> {
        if !super::enabled() {
            return generic::rotate(rotary, x);
        }
        let (dtype, dims) = (x.dtype(), x.dims());
        let [_, tokens, heads, head_dim] = dims;
        let table = rotary.table();
        let mut values = take_f32(x);
        kernels::rotate(
            &mut values,
            [tokens, heads, head_dim],
            [&table.cos, &table.sin],
            table.items,
            rotary.layout() == RotaryLayout::Halves,
        );
        give_f32(values, dims, dtype)
    }

    /// Without the copy burn-ndarray's own reshape always makes.
    fn reshape<const D1: usize, const D2: usize>(
        t: Tensor<Self, D1>,
        shape: [usize; D2],
    ) -> Tensor<Self, D2> {
        if !super::enabled() || t.dtype() != DType::F32 {
            return t.reshape(shape);
        }
        assert_eq!(
            t.shape().num_elements(),
            shape.iter().product::<usize>(),
            "reshape {:?} to {shape:?}",
            t.dims()
        );
        give_f32(take_f32(t), shape, DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::module::conv2d as burn_conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Distribution, TensorData};

    use super::*;
    use crate::host::without_host_kernels;
    use crate::{RotaryTable, Weights};

    type B = NdArray<f32>;

    fn random<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), &Default::default())
    }

    fn assert_close<const D: usize>(what: &str, host: Tensor<B, D>, generic: Tensor<B, D>) {
        assert_eq!(host.dims(), generic.dims(), "{what}");
        let scale = generic.clone().abs().max().into_scalar().max(1.0);
        let diff = (host - generic).abs().max().into_scalar();
        assert!(
            diff <= 2e-5 * scale,
            "{what}: host and generic differ by {diff}"
        );
    }

    /// Runs `f` with the host kernels and without them (the code GPUs run), for the same inputs.
    fn both<const D: usize>(what: &str, f: impl Fn() -> Tensor<B, D>) {
        let device = Default::default();
        assert!(B::host_kernels(&device));
        let host = f();
        let generic = without_host_kernels(|| {
            assert!(!B::host_kernels(&device));
            f()
        });
        assert_close(what, host, generic);
    }

    /// Every layer of the seam, host kernels against the generic path, with weights held on the
    /// host in each format (f32, bf16, f16) and, without host kernels, as device tensors.
    #[test]
    fn host_kernels_match_the_generic_path() {
        let device = Default::default();
        for weights in [None, Some(DType::BF16), Some(DType::F16)] {
            let precision = crate::Precision::from(DType::F32).with_weights(weights);
            // Built inside each run, so that each path holds the weights its own way.
            let linear =
                || Linear::<B>::load(&Weights::random(&device, precision), 48, 70, true).unwrap();
            let x = random([2, 5, 48]);
            // The same random weights on both paths: built once with host kernels, the generic
            // path reads the host matrix through an upload.
            let layer = linear();
            both("linear", || layer.forward(x.clone()));
            let embedding =
                Embedding::<B>::load(&Weights::random(&device, precision), 30, 16).unwrap();
            both("embedding", || embedding.forward(&[3, 0, 29, 3]));
            for (k, stride, padding) in [(3, 1, 1), (3, 2, 0), (1, 1, 0)] {
                let conv = Conv2d::<B>::load(
                    &Weights::random(&device, precision),
                    3,
                    5,
                    k,
                    stride,
                    padding,
                )
                .unwrap();
                let x = random([2, 3, 9, 7]);
                both("conv2d", || conv.forward(x.clone()));
            }
        }
        // Weights loaded without host kernels are device tensors; the host path accepts them.
        let device_layer = without_host_kernels(|| {
            Linear::<B>::load(&Weights::random(&device, DType::F32), 48, 70, false).unwrap()
        });
        assert!(matches!(device_layer.weight, Stored::Device(_)));
        let x = random([3, 48]);
        both("linear (device weight)", || device_layer.forward(x.clone()));

        let norm = RmsNorm::<B> {
            weight: random([16]),
            eps: 1e-6,
        };
        let x = random([2, 7, 16]);
        let y = random([2, 7, 16]);
        let m = random([2, 16]);
        both("rms_norm", || norm.forward(x.clone()));
        both("rms_norm_scaled", || norm.forward_scaled(x.clone(), &m));
        both("add_rms_norm", || {
            norm.add_to(x.clone(), y.clone(), Some(&m))
        });
        both("add_rms_norm (no gate)", || {
            norm.add_to(x.clone(), y.clone(), None)
        });
        both("silu_mul", || crate::silu_mul(x.clone(), y.clone()));
        let group_norm = GroupNorm::<B> {
            weight: random([8]),
            bias: random([8]),
            groups: 4,
            eps: 1e-6,
        };
        let image = random([2, 8, 5, 3]);
        both("group_norm", || group_norm.forward(image.clone()));
        both("group_norm + silu", || {
            group_norm.forward_silu(image.clone())
        });
        for (layout, items) in [(RotaryLayout::Interleaved, 2), (RotaryLayout::Halves, 1)] {
            let (tokens, pairs) = (6, 4);
            let angles: Vec<f32> = (0..items * tokens * pairs)
                .map(|i| i as f32 * 0.37)
                .collect();
            let table = RotaryTable {
                cos: angles.iter().map(|a| a.cos()).collect(),
                sin: angles.iter().map(|a| a.sin()).collect(),
                items,
                tokens,
                pairs,
            };
            let x = random([2, tokens, 3, 2 * pairs]);
            both("rotate", || {
                Rotary::<B>::new(layout, table.clone(), &device).apply(x.clone())
            });
        }
        let t = random([4, 6, 5]);
        both("reshape", || crate::reshape::<B, 3, 2>(t.clone(), [24, 5]));
    }

    /// The convolution against burn's own, for the kernel/stride/padding combinations the VAE uses
    /// and sizes where the kernel reaches past both borders.
    #[test]
    fn convolution_matches_burn() {
        let device = Default::default();
        for (k, stride, padding) in [(3, 1, 1), (3, 2, 0), (1, 1, 0), (3, 1, 0), (3, 2, 1)] {
            for (h, w) in [(7, 5), (1, 4), (6, 9), (2, 3)] {
                if h + 2 * padding < k || w + 2 * padding < k {
                    continue;
                }
                let conv = Conv2d::<B>::load(
                    &Weights::random(&device, DType::F32),
                    3,
                    4,
                    k,
                    stride,
                    padding,
                )
                .unwrap();
                let Stored::Host(weight) = &conv.weight else {
                    panic!("host kernels hold weights on the host")
                };
                let weight = Tensor::<B, 4>::from_data(
                    TensorData::new(weight.to_f32(), [4, 3, k, k]),
                    &device,
                );
                let x = random([2, 3, h, w]);
                let expected = burn_conv2d(
                    x.clone(),
                    weight,
                    Some(conv.bias.clone()),
                    ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1),
                );
                assert_close(
                    &format!("k{k} s{stride} p{padding} {h}x{w}"),
                    conv.forward(x),
                    expected,
                );
            }
        }
    }
}
