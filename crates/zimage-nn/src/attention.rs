//! Scaled dot-product attention with an optional key-padding mask.

use burn::tensor::backend::Backend;
use burn::tensor::module::attention as backend_attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{activation::softmax, Bool, DType, Tensor};

/// Which implementation computes attention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AttentionImpl {
    /// [`AttentionImpl::Host`] on burn-ndarray, [`AttentionImpl::Backend`] elsewhere.
    #[default]
    Auto,
    /// `burn::tensor::module::attention`: the backend's own (fused where it has one).
    Backend,
    /// Plain matmul-softmax-matmul with the softmax in f32; the reference the others are
    /// tested against.
    Reference,
    /// Blocked attention on the host in f32 (copies in and out). burn-ndarray's attention
    /// materialises the whole score tensor and runs its element-wise passes on one thread; this
    /// keeps a block of scores in cache and runs blocks in parallel, ~5x faster on a CPU.
    Host,
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
    let imp = match imp {
        AttentionImpl::Auto if B::name(&q.device()).starts_with("ndarray") => AttentionImpl::Host,
        AttentionImpl::Auto => AttentionImpl::Backend,
        other => other,
    };
    if imp == AttentionImpl::Host {
        return host::attention(q, k, v, key_valid, causal);
    }
    match imp {
        AttentionImpl::Backend | AttentionImpl::Auto | AttentionImpl::Host => {
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

mod host {
    use burn::tensor::backend::Backend;
    use burn::tensor::{Bool, DType, Tensor, TensorData};
    use rayon::prelude::*;

    /// Query rows per block: a block's scores (`QUERY_BLOCK x keys` f32) stay in L2.
    const QUERY_BLOCK: usize = 64;

    fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.cast(DType::F32)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default()
    }

    pub fn attention<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        key_valid: Option<&Tensor<B, 2, Bool>>,
        causal: bool,
    ) -> Tensor<B, 4> {
        let device = q.device();
        let dtype = q.dtype();
        let [batch, heads, queries, d] = q.dims();
        let keys = k.dims()[2];
        let valid: Option<Vec<bool>> =
            key_valid.map(|m| m.clone().into_data().into_vec::<bool>().unwrap_or_default());
        let (q, k, v) = (host_f32(q), host_f32(k), host_f32(v));
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; batch * heads * queries * d];
        // One task per (batch, head), split into blocks of query rows.
        let head_len = queries * d;
        out.par_chunks_mut(head_len)
            .enumerate()
            .for_each(|(bh, out_head)| {
                let b = bh / heads;
                let base_q = &q[bh * head_len..(bh + 1) * head_len];
                let base_k = &k[bh * keys * d..(bh + 1) * keys * d];
                let base_v = &v[bh * keys * d..(bh + 1) * keys * d];
                let key_ok = valid.as_ref().map(|m| &m[b * keys..(b + 1) * keys]);
                out_head
                    .par_chunks_mut(QUERY_BLOCK * d)
                    .enumerate()
                    .for_each(|(blk, out_rows)| {
                        let q0 = blk * QUERY_BLOCK;
                        let rows = out_rows.len() / d;
                        let mut scores = vec![0f32; rows * keys];
                        // scores = scale * q_blk k^T (k read transposed through its strides).
                        // SAFETY: every pointer/stride pair addresses a slice of the stated size.
                        unsafe {
                            matrixmultiply::sgemm(
                                rows,
                                d,
                                keys,
                                scale,
                                base_q[q0 * d..].as_ptr(),
                                d as isize,
                                1,
                                base_k.as_ptr(),
                                1,
                                d as isize,
                                0.0,
                                scores.as_mut_ptr(),
                                keys as isize,
                                1,
                            );
                        }
                        let offset = keys as i64 - queries as i64;
                        for (r, row) in scores.chunks_mut(keys).enumerate() {
                            let qi = (q0 + r) as i64;
                            let mut max = f32::NEG_INFINITY;
                            for (j, s) in row.iter_mut().enumerate() {
                                let hidden = key_ok.is_some_and(|m| !m[j])
                                    || (causal && j as i64 > qi + offset);
                                if hidden {
                                    *s = f32::NEG_INFINITY;
                                } else if *s > max {
                                    max = *s;
                                }
                            }
                            let mut sum = 0f32;
                            if max == f32::NEG_INFINITY {
                                row.iter_mut().for_each(|s| *s = 0.0);
                                continue;
                            }
                            for s in row.iter_mut() {
                                *s = (*s - max).exp();
                                sum += *s;
                            }
                            let inv = 1.0 / sum;
                            row.iter_mut().for_each(|s| *s *= inv);
                        }
                        // SAFETY: as above; `out_rows` holds `rows x d` values.
                        unsafe {
                            matrixmultiply::sgemm(
                                rows,
                                keys,
                                d,
                                1.0,
                                scores.as_ptr(),
                                keys as isize,
                                1,
                                base_v.as_ptr(),
                                d as isize,
                                1,
                                0.0,
                                out_rows.as_mut_ptr(),
                                d as isize,
                                1,
                            );
                        }
                    });
            });
        Tensor::<B, 4>::from_data(
            TensorData::new(out, [batch, heads, queries, d]),
            (&device, DType::F32),
        )
        .cast(dtype)
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
                    for imp in [
                        AttentionImpl::Backend,
                        AttentionImpl::Host,
                        AttentionImpl::Auto,
                    ] {
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
