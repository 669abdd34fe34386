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
    /// Blocked attention on the host in f32 (copies in and out where the backend is not
    /// burn-ndarray). burn-ndarray's attention materialises the whole score tensor and runs its
    /// element-wise passes on one thread; this packs each head's keys and values once, keeps a
    /// block of scores in cache, and runs heads in parallel.
    Host,
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
pub fn attention<B: Backend>(
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
    let imp = match imp {
        AttentionImpl::Auto if crate::host::is_host_backend::<B>(&q.device()) => {
            AttentionImpl::Host
        }
        AttentionImpl::Auto => AttentionImpl::Backend,
        other => other,
    };
    if imp == AttentionImpl::Host {
        return host::attention(q, k, v, key_valid, causal);
    }
    let groups = heads / kv_heads;
    let expand = |t: Tensor<B, 4>| {
        if groups == 1 {
            return t;
        }
        t.unsqueeze_dim::<5>(2)
            .expand([batch, kv_heads, groups, keys, d])
            .reshape([batch, heads, keys, d])
    };
    let (k, v) = (expand(k), expand(v));
    // burn's mask marks what is hidden; give it the full [batch, heads, queries, keys] shape.
    let mask = key_valid.map(|valid| {
        valid
            .clone()
            .bool_not()
            .reshape([batch, 1, 1, keys])
            .expand([batch, heads, queries, keys])
    });
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
    use burn::tensor::{Bool, Tensor};
    use rayon::prelude::*;

    use crate::host::gemm::{MatRef, PackedB, Threads};
    use crate::host::{from_f32, host_f32, kernels};

    /// Query rows per block: a block's scores (`QUERY_BLOCK x keys` f32) stay in L2.
    const QUERY_BLOCK: usize = 64;

    /// The output buffer, shared by tasks that write disjoint rows of it.
    #[derive(Clone, Copy)]
    struct OutPtr(*mut f32);
    // SAFETY: each task writes only its own (batch, head) columns.
    unsafe impl Send for OutPtr {}
    unsafe impl Sync for OutPtr {}

    impl OutPtr {
        fn at(self, offset: usize) -> *mut f32 {
            // SAFETY: callers pass offsets inside the buffer.
            unsafe { self.0.add(offset) }
        }
    }

    /// Works tokens-major (`[batch, tokens, heads, d]`), the layout the projections produce: the
    /// callers' `[batch, heads, tokens, d]` views of it are swapped back, so the host copies are
    /// plain memory copies and no head is ever materialised per key/value group.
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
        let [_, kv_heads, keys, _] = k.dims();
        let groups = heads / kv_heads;
        let valid: Option<Vec<bool>> =
            key_valid.map(|m| m.clone().into_data().into_vec::<bool>().unwrap_or_default());
        let tokens_major = |t: Tensor<B, 4>| host_f32(t.swap_dims(1, 2));
        let (q, k, v) = (tokens_major(q), tokens_major(k), tokens_major(v));
        let scale = 1.0 / (d as f32).sqrt();
        // Row strides of the tokens-major buffers.
        let (q_row, kv_row) = (heads * d, kv_heads * d);
        let mut out = vec![0f32; batch * queries * heads * d];
        let out_ptr = OutPtr(out.as_mut_ptr());
        let offset = keys as i64 - queries as i64;
        // One task per (batch, head): its keys and values are packed once for all query blocks.
        (0..batch * heads).into_par_iter().for_each(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            let kvh = h / groups;
            let key_ok = valid.as_ref().map(|m| &m[b * keys..(b + 1) * keys]);
            let k_head = k[b * keys * kv_row + kvh * d..].as_ptr();
            let v_head = v[b * keys * kv_row + kvh * d..].as_ptr();
            // SAFETY: k^T (d x keys) and v (keys x d) are read inside this batch item's rows,
            // `kv_row` apart.
            let (k_t, v_packed) = unsafe {
                (
                    PackedB::new(
                        d,
                        keys,
                        MatRef {
                            ptr: k_head,
                            rs: 1,
                            cs: kv_row as isize,
                        },
                        Threads::Single,
                    ),
                    PackedB::new(
                        keys,
                        d,
                        MatRef {
                            ptr: v_head,
                            rs: kv_row as isize,
                            cs: 1,
                        },
                        Threads::Single,
                    ),
                )
            };
            let mut scores = vec![0f32; QUERY_BLOCK.min(queries) * keys];
            for q0 in (0..queries).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(queries - q0);
                let scores = &mut scores[..rows * keys];
                let q_blk = MatRef {
                    ptr: q[(b * queries + q0) * q_row + h * d..].as_ptr(),
                    rs: q_row as isize,
                    cs: 1,
                };
                // SAFETY: q_blk is `rows x d` inside q; scores is `rows x keys`, dense.
                unsafe {
                    k_t.multiply(
                        rows,
                        q_blk,
                        scores.as_mut_ptr(),
                        keys,
                        false,
                        Threads::Single,
                    )
                };
                for (r, row) in scores.chunks_mut(keys).enumerate() {
                    let qi = (q0 + r) as i64;
                    if let Some(ok) = key_ok {
                        row.iter_mut()
                            .zip(ok)
                            .filter(|(_, ok)| !**ok)
                            .for_each(|(s, _)| *s = f32::NEG_INFINITY);
                    }
                    if causal {
                        let first_hidden = (qi + offset + 1).clamp(0, keys as i64) as usize;
                        row[first_hidden..].fill(f32::NEG_INFINITY);
                    }
                    kernels::softmax(row, scale);
                }
                // out[b, q0.., h, :] = scores v
                // SAFETY: scores is `rows x keys`; this task alone writes these output rows of
                // head h, `q_row` apart.
                unsafe {
                    v_packed.multiply(
                        rows,
                        MatRef::row_major(scores, keys),
                        out_ptr.at((b * queries + q0) * q_row + h * d),
                        q_row,
                        false,
                        Threads::Single,
                    )
                };
            }
        });
        from_f32::<B, 4>(out, [batch, queries, heads, d], &device, dtype).swap_dims(1, 2)
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
            AttentionImpl::Host,
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
