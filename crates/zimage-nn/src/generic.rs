//! The generic implementation of every [`crate::ZBackend`] layer: burn's own tensor ops, what cuda
//! and wgpu run. These are the defaults of the trait's methods; the host kernels are tested
//! against them.

use burn::tensor::backend::Backend;
use burn::tensor::module::{attention as backend_attention, conv2d as backend_conv2d};
use burn::tensor::ops::{AttentionModuleOptions, ConvOptions};
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};

use crate::{
    Conv2d, Embedding, GroupNorm, Linear, RmsNorm, Rotary, RotaryLayout, Stored, ZBackend,
};

/// A stored weight as a device tensor of `shape` in `dtype` (host matrices are uploaded: only
/// when a model loaded for host kernels runs without them).
fn device_tensor<B: ZBackend, const D: usize>(
    weight: &Stored<B, D>,
    shape: [usize; D],
    device: &B::Device,
    dtype: DType,
) -> Tensor<B, D> {
    match weight {
        Stored::Device(t) if t.dtype() == dtype => t.clone(),
        Stored::Device(t) => t.clone().cast(dtype),
        Stored::Host(m) => {
            Tensor::<B, D>::from_data(TensorData::new(m.to_f32(), shape), (device, DType::F32))
                .cast(dtype)
        }
        Stored::Quantized(q) => q.dequantize(dtype).reshape(shape),
    }
}

pub fn linear<B: ZBackend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let mut dims = x.dims();
    let (k, n) = (layer.in_features(), layer.out_features());
    let rows = dims[..D - 1].iter().product::<usize>();
    dims[D - 1] = n;
    let (device, dtype) = (x.device(), x.dtype());
    let weight = match &layer.weight {
        // Held as stored, `[out, in]`.
        Stored::Host(_) | Stored::Quantized(_) => {
            device_tensor(&layer.weight, [n, k], &device, dtype).transpose()
        }
        // Held transposed, `[in, out]`.
        device_weight => device_tensor(device_weight, [k, n], &device, dtype),
    };
    let y = x.reshape([rows, k]).matmul(weight);
    let y = match &layer.bias {
        Some(bias) => y + bias.clone().unsqueeze::<2>(),
        None => y,
    };
    y.reshape(dims)
}

pub fn embedding<B: ZBackend>(layer: &Embedding<B>, ids: &[u32]) -> Tensor<B, 2> {
    let device = layer.device();
    let n = ids.len();
    match &layer.table {
        // Only the rows asked for are decoded (a Qwen3 table is 151936 rows).
        Stored::Quantized(q) => {
            let ids: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
            let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), device);
            return q.select_rows(ids).dequantize(layer.dtype());
        }
        Stored::Host(table) => {
            use crate::host::gemm::RowSource;
            let dim = layer.dim();
            let mut rows = vec![0f32; n * dim];
            for (row, &id) in rows.chunks_mut(dim).zip(ids) {
                table.read_row(id as usize, 0, row);
            }
            return Tensor::<B, 2>::from_data(
                TensorData::new(rows, [n, dim]),
                (device, DType::F32),
            )
            .cast(layer.dtype());
        }
        Stored::Device(_) => {}
    }
    let table = device_tensor(
        &layer.table,
        [layer.vocab_size(), layer.dim()],
        device,
        layer.dtype(),
    );
    let ids: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
    table.select(
        0,
        Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [n]), device),
    )
}

pub fn rms_norm<B: ZBackend, const D: usize>(layer: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let weight = layer.weight.clone();
    let x = x.cast(DType::F32);
    let mean_square = x.clone().square().mean_dim(D - 1);
    let y = x * rsqrt(mean_square.add_scalar(layer.eps));
    y.cast(weight.dtype()) * weight.unsqueeze::<D>()
}

pub fn rms_norm_scaled<B: ZBackend>(
    layer: &RmsNorm<B>,
    x: Tensor<B, 3>,
    multiplier: &Tensor<B, 2>,
) -> Tensor<B, 3> {
    rms_norm(layer, x) * multiplier.clone().unsqueeze_dim::<3>(1)
}

pub fn add_rms_norm<B: ZBackend>(
    layer: &RmsNorm<B>,
    residual: Tensor<B, 3>,
    y: Tensor<B, 3>,
    multiplier: Option<&Tensor<B, 2>>,
) -> Tensor<B, 3> {
    let normed = rms_norm(layer, y);
    match multiplier {
        Some(m) => residual + m.clone().unsqueeze_dim::<3>(1) * normed,
        None => residual + normed,
    }
}

/// `1 / sqrt(x)` by an exact division. (`Tensor::recip` is an approximate reciprocal on
/// burn-ndarray's SIMD path, off by ~1e-5 relative: too coarse for parity.)
pub(crate) fn rsqrt<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let root = x.sqrt();
    root.ones_like() / root
}

pub fn silu_mul<B: ZBackend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    burn::tensor::activation::silu(a) * b
}

/// burn's `module::attention` (fused where the backend has it), with grouped-query heads
/// repeated and the key-padding mask expanded to the full score shape it takes.
pub fn attention<B: ZBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_valid: Option<&Tensor<B, 2, Bool>>,
    causal: bool,
) -> Tensor<B, 4> {
    let [_, heads, queries, _] = q.dims();
    let (k, v) = (repeat_kv(k, heads), repeat_kv(v, heads));
    let mask = key_valid.map(|valid| hidden_keys(valid, heads, queries));
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: causal,
    };
    backend_attention(q, k, v, mask, None, options)
}

/// Key/value heads repeated for their groups of query heads (transformers' `repeat_kv`).
pub(crate) fn repeat_kv<B: ZBackend>(t: Tensor<B, 4>, heads: usize) -> Tensor<B, 4> {
    let [batch, kv_heads, keys, d] = t.dims();
    let groups = heads / kv_heads;
    if groups == 1 {
        return t;
    }
    t.unsqueeze_dim::<5>(2)
        .expand([batch, kv_heads, groups, keys, d])
        .reshape([batch, heads, keys, d])
}

/// burn's mask marks what is hidden, in the full `[batch, heads, queries, keys]` shape.
pub(crate) fn hidden_keys<B: ZBackend>(
    valid: &Tensor<B, 2, Bool>,
    heads: usize,
    queries: usize,
) -> Tensor<B, 4, Bool> {
    let [batch, keys] = valid.dims();
    valid
        .clone()
        .bool_not()
        .reshape([batch, 1, 1, keys])
        .expand([batch, heads, queries, keys])
}

pub fn conv2d<B: ZBackend>(layer: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let (k, cin, cout) = (layer.kernel(), layer.in_channels(), layer.out_channels());
    let weight = device_tensor(&layer.weight, [cout, cin, k, k], &x.device(), x.dtype());
    backend_conv2d(
        x,
        weight,
        Some(layer.bias.clone()),
        ConvOptions::new([layer.stride(); 2], [layer.padding(); 2], [1, 1], 1),
    )
}

/// Statistics and the affine map in f32 whatever the dtype, in PyTorch's form: per-channel
/// `scale = gamma / sqrt(var + eps)` and `shift = beta - mean * scale`, then `x * scale + shift`.
pub fn group_norm<B: ZBackend>(layer: &GroupNorm<B>, x: Tensor<B, 4>, silu: bool) -> Tensor<B, 4> {
    let [batch, channels, height, width] = x.dims();
    let groups = layer.groups;
    let dtype = x.dtype();
    let x = x.cast(DType::F32);
    let grouped = x
        .clone()
        .reshape([batch, groups, (channels / groups) * height * width]);
    let mean = grouped.clone().mean_dim(2);
    let var = (grouped - mean.clone()).square().mean_dim(2);
    let std = var.add_scalar(layer.eps).sqrt();
    // [batch, groups, 1] -> per channel [batch, groups, channels / groups]
    let per_channel = |t: &Tensor<B, 1>| {
        t.clone()
            .cast(DType::F32)
            .reshape([1, groups, channels / groups])
    };
    // Exact division (`recip` is approximate on some backends).
    let scale = per_channel(&layer.weight) / std;
    let shift = per_channel(&layer.bias) - mean * scale.clone();
    let scale = scale.reshape([batch, channels, 1, 1]);
    let shift = shift.reshape([batch, channels, 1, 1]);
    // Rounded to the dtype before the SiLU, as PyTorch runs the two modules.
    let y = (x * scale + shift).cast(dtype);
    if silu {
        crate::activation::silu(y)
    } else {
        y
    }
}

pub fn rotate<B: ZBackend>(rotary: &Rotary<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let dtype = x.dtype();
    let [batch, tokens, heads, head_dim] = x.dims();
    let (cos, sin) = rotary.device_tables(&x.device());
    match rotary.layout() {
        // diffusers: complex multiplication of (re, im) pairs in f32, cast back.
        RotaryLayout::Interleaved => {
            let x = x
                .cast(DType::F32)
                .reshape([batch, tokens, heads, head_dim / 2, 2]);
            let re = x.clone().narrow(4, 0, 1);
            let im = x.narrow(4, 1, 1);
            let cos: Tensor<B, 5> = cos.unsqueeze_dim(4);
            let sin: Tensor<B, 5> = sin.unsqueeze_dim(4);
            let out_re = re.clone() * cos.clone() - im.clone() * sin.clone();
            let out_im = re * sin + im * cos;
            Tensor::cat(vec![out_re, out_im], 4)
                .reshape([batch, tokens, heads, head_dim])
                .cast(dtype)
        }
        // transformers: `x * cos + rotate_half(x) * sin` in the activation dtype, with
        // `rotate_half(x) = cat(-x[d/2:], x[:d/2])` and each angle used for both halves.
        RotaryLayout::Halves => {
            let half = head_dim / 2;
            let both = |t: Tensor<B, 4>| Tensor::cat(vec![t.clone(), t], 3).cast(dtype);
            let (cos, sin) = (both(cos), both(sin));
            let first = x.clone().narrow(3, 0, half);
            let second = x.clone().narrow(3, half, half);
            let rotated = Tensor::cat(vec![second.neg(), first], 3);
            x * cos + rotated * sin
        }
    }
}
