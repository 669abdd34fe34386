//! Scaled dot-product attention with an optional key-padding mask.

use burn::tensor::backend::Backend;
use burn::tensor::module::attention as backend_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{activation::softmax, Bool, DType, Tensor};

/// Which implementation computes attention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionImpl {
    /// `burn::tensor::module::attention`: the backend's own (fused where it has one).
    #[default]
    Backend,
    /// Plain matmul-softmax-matmul with the softmax in f32; the reference the fused path is
    /// tested against.
    Reference,
}

/// `softmax(q k^T / sqrt(d) + mask) v`.
///
/// `key_valid`: `[batch, keys]`, `true` where a key may be attended (batch padding is `false`).
/// `causal`: queries see only keys at or before their own position.
///
/// # Shapes
/// q `[batch, heads, queries, d]`, k and v `[batch, heads, keys, d]` -> `[batch, heads, queries, d]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_valid: Option<&Tensor<B, 2, Bool>>,
    causal: bool,
    imp: AttentionImpl,
) -> Tensor<B, 4> {
    let [batch, heads, queries, d] = q.dims();
    let keys = k.dims()[2];
    // burn's mask marks what is hidden; give it the full [batch, heads, queries, keys] shape.
    let mask = key_valid.map(|valid| {
        valid
            .clone()
            .bool_not()
            .reshape([batch, 1, 1, keys])
            .expand([batch, heads, queries, keys])
    });
    match imp {
        AttentionImpl::Backend => {
            let options = AttentionModuleOptions {
                scale: None,
                softcap: None,
                is_causal: causal,
            };
            backend_attention(q, k, v, mask, None, options)
        }
        AttentionImpl::Reference => {
            let dtype = q.dtype();
            let scores = q.matmul(k.swap_dims(2, 3)).cast(DType::F32) / (d as f64).sqrt();
            let scores = match mask {
                Some(mask) => scores.mask_fill(mask, f32::NEG_INFINITY),
                None => scores,
            };
            let scores = if causal {
                let hidden = Tensor::<B, 2, Bool>::tril_mask(
                    [queries, keys],
                    (keys as i64) - (queries as i64),
                    &scores.device(),
                );
                scores.mask_fill(
                    hidden
                        .unsqueeze::<4>()
                        .expand([batch, heads, queries, keys]),
                    f32::NEG_INFINITY,
                )
            } else {
                scores
            };
            softmax(scores, 3).cast(dtype).matmul(v)
        }
    }
}
