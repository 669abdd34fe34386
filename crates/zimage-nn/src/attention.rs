//! Scaled dot-product attention with an optional key-padding mask.

use burn::tensor::{activation::softmax, Bool, DType, Tensor};

use crate::generic::{hidden_keys, repeat_kv};
use crate::ZBackend;

/// Which implementation computes attention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionImpl {
    /// The backend's choice ([`ZBackend::attend`]): the host kernel on burn-ndarray, burn's
    /// `module::attention` elsewhere.
    #[default]
    Auto,
    /// `burn::tensor::module::attention`: burn's own (fused where the backend has one).
    Backend,
    /// Plain matmul-softmax-matmul with the softmax in f32; the reference the others are
    /// tested against.
    Reference,
}

/// `softmax(q k^T / sqrt(d) + mask) v`, with grouped-query attention: query head `h` reads key/value
/// head `h / (heads / kv_heads)`, as transformers' `repeat_kv`.
///
/// `key_valid`: `[batch, keys]`, `true` where a key may be attended (batch padding is `false`).
/// `causal`: queries see only keys at or before their own position.
///
/// # Shapes
/// q `[batch, heads, queries, d]`, k and v `[batch, kv_heads, keys, d]` ->
/// `[batch, heads, queries, d]`
pub fn attention<B: ZBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_valid: Option<&Tensor<B, 2, Bool>>,
    causal: bool,
    imp: AttentionImpl,
) -> Tensor<B, 4> {
    let [batch, heads, queries, d] = q.dims();
    let [_, kv_heads, keys, _] = k.dims();
    assert!(
        kv_heads > 0 && heads % kv_heads == 0,
        "{heads} query heads for {kv_heads} key/value heads"
    );
    match imp {
        AttentionImpl::Auto => B::attend(q, k, v, key_valid, causal),
        AttentionImpl::Backend => crate::generic::attention(q, k, v, key_valid, causal),
        AttentionImpl::Reference => {
            let (k, v) = (repeat_kv(k, heads), repeat_kv(v, heads));
            let dtype = q.dtype();
            let scores = q.matmul(k.swap_dims(2, 3)).cast(DType::F32) / (d as f64).sqrt();
            let scores = match key_valid {
                Some(valid) => {
                    scores.mask_fill(hidden_keys(valid, heads, queries), f32::NEG_INFINITY)
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::{Distribution, TensorData};

    type B = NdArray<f32>;

    fn max_diff(a: Tensor<B, 4>, b: Tensor<B, 4>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn grouped_query_attention_reads_the_right_heads() {
        let device = Default::default();
        // 6 query heads over 2 key/value heads, against the same heads repeated by hand.
        let q = Tensor::<B, 4>::random([2, 6, 9, 8], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<B, 4>::random([2, 2, 11, 8], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<B, 4>::random([2, 2, 11, 8], Distribution::Normal(0.0, 1.0), &device);
        let repeat = |t: Tensor<B, 4>| {
            Tensor::cat(
                (0..6)
                    .map(|h| t.clone().narrow(1, h / 3, 1))
                    .collect::<Vec<_>>(),
                1,
            )
        };
        let reference = attention(
            q.clone(),
            repeat(k.clone()),
            repeat(v.clone()),
            None,
            true,
            AttentionImpl::Reference,
        );
        for imp in [
            AttentionImpl::Reference,
            AttentionImpl::Backend,
            AttentionImpl::Auto,
        ] {
            let got = attention(q.clone(), k.clone(), v.clone(), None, true, imp);
            let diff = max_diff(got, reference.clone());
            assert!(diff < 1e-5, "{imp:?}: {diff}");
        }
    }

    #[test]
    fn every_implementation_agrees() {
        let device = Default::default();
        // 70 queries: one full block of 64 and a ragged one; keys differ from queries (causal offset).
        for (queries, keys) in [(70, 70), (5, 9), (130, 130)] {
            let q = Tensor::<B, 4>::random(
                [2, 3, queries, 16],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let k =
                Tensor::<B, 4>::random([2, 3, keys, 16], Distribution::Normal(0.0, 1.0), &device);
            let v =
                Tensor::<B, 4>::random([2, 3, keys, 16], Distribution::Normal(0.0, 1.0), &device);
            let valid: Vec<bool> = (0..2 * keys)
                .map(|i| i < keys || i % keys < keys - 3)
                .collect();
            let valid = Tensor::<B, 2, Bool>::from_data(TensorData::new(valid, [2, keys]), &device);
            for mask in [None, Some(&valid)] {
                for causal in [false, true] {
                    let run = |imp| attention(q.clone(), k.clone(), v.clone(), mask, causal, imp);
                    let reference = run(AttentionImpl::Reference);
                    for imp in [AttentionImpl::Backend, AttentionImpl::Auto] {
                        let diff = max_diff(run(imp), reference.clone());
                        assert!(
                            diff < 1e-5,
                            "{imp:?} q{queries} k{keys} mask {} causal {causal}: {diff}",
                            mask.is_some()
                        );
                    }
                }
            }
        }
    }
}
