//! Blocked attention on the host: each (batch item, head) packs its keys and values once and
//! runs query blocks through the same product, with the scores of a block kept in cache.

use rayon::prelude::*;

use super::gemm::{MatRef, Operand, PackedB, Threads};
use super::kernels;

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

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    /// Key/value heads; query head `h` reads `h / (heads / kv_heads)`.
    pub kv_heads: usize,
    pub queries: usize,
    pub keys: usize,
    pub head_dim: usize,
}

/// `softmax(q k^T / sqrt(d) + mask) v` on tokens-major buffers (`[batch, tokens, heads, d]`, the
/// layout the projections produce); the result is tokens-major too. `key_valid` is
/// `[batch, keys]`; `causal` lets query `i` see keys up to `i + keys - queries`.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    shape: AttentionShape,
    key_valid: Option<&[bool]>,
    causal: bool,
) -> Vec<f32> {
    let AttentionShape {
        batch,
        heads,
        kv_heads,
        queries,
        keys,
        head_dim: d,
    } = shape;
    let groups = heads / kv_heads;
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
        let key_ok = key_valid.map(|m| &m[b * keys..(b + 1) * keys]);
        let k_head = k[b * keys * kv_row + kvh * d..].as_ptr();
        let v_head = v[b * keys * kv_row + kvh * d..].as_ptr();
        // SAFETY: k^T (d x keys) and v (keys x d) are read inside this batch item's rows,
        // `kv_row` apart.
        let (k_t, v_packed) = unsafe {
            (
                PackedB::new(
                    d,
                    keys,
                    Operand::Strided(MatRef {
                        ptr: k_head,
                        rs: 1,
                        cs: kv_row as isize,
                    }),
                    Threads::Single,
                ),
                PackedB::new(
                    keys,
                    d,
                    Operand::Strided(MatRef {
                        ptr: v_head,
                        rs: kv_row as isize,
                        cs: 1,
                    }),
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
                    Operand::Strided(q_blk),
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
                    Operand::Strided(MatRef::row_major(scores, keys)),
                    out_ptr.at((b * queries + q0) * q_row + h * d),
                    q_row,
                    false,
                    Threads::Single,
                )
            };
        }
    });
    out
}
