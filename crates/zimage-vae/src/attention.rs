use burn::tensor::Tensor;
use zimage_nn::attention::attention;
use zimage_nn::ZBackend;
use zimage_nn::{AttentionImpl, CheckpointError, Linear, Weights};

use crate::checkpoint::ProjectionLayout;
use zimage_nn::GroupNorm;

use crate::GROUP_NORM_EPS;

/// Queries per attention call. Single-head attention over every latent pixel is quadratic: at
/// 1024x1024 pixels (16,384 latent pixels) one score matrix is 1 GiB in f32, so backends that
/// materialise it (ndarray) get it in slices of this many rows. Rows of a softmax are independent,
/// so the result is the same.
const QUERY_CHUNK: usize = 4096;

/// The mid-block self-attention (`attentions.0`, diffusers' `Attention` built with
/// `_from_deprecated_attn_block`): GroupNorm, one head as wide as the channels, q/k/v/out
/// projections with biases, residual added.
#[derive(Debug, Clone)]
pub struct Attention<B: ZBackend> {
    pub group_norm: GroupNorm<B>,
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    /// `to_out.0` (`to_out.1` is a dropout).
    pub to_out: Linear<B>,
}

impl<B: ZBackend> Attention<B> {
    pub fn load(
        w: &Weights<B>,
        channels: usize,
        groups: usize,
        layout: ProjectionLayout,
    ) -> Result<Self, CheckpointError> {
        let projection = |w: &Weights<B>| -> Result<Linear<B>, CheckpointError> {
            let stored: &[usize] = match layout {
                ProjectionLayout::Linear => &[channels, channels],
                // BFL's 1x1 convolutions: the same values as `[out, in, 1, 1]`.
                ProjectionLayout::Conv1x1 => &[channels, channels, 1, 1],
            };
            Linear::load_stored_as(w, channels, channels, true, stored)
        };
        Ok(Self {
            group_norm: GroupNorm::load(&w.pp("group_norm"), groups, channels, GROUP_NORM_EPS)?,
            to_q: projection(&w.pp("to_q"))?,
            to_k: projection(&w.pp("to_k"))?,
            to_v: projection(&w.pp("to_v"))?,
            to_out: projection(&w.pp("to_out").pp(0))?,
        })
    }

    /// # Shapes
    /// `[batch, channels, height, width]` -> the same
    pub fn forward(&self, x: Tensor<B, 4>, imp: AttentionImpl) -> Tensor<B, 4> {
        let [batch, channels, height, width] = x.dims();
        let tokens = height * width;
        // [batch, channels, h, w] -> [batch, tokens, channels]
        let h = self
            .group_norm
            .forward(x.clone())
            .reshape([batch, channels, tokens])
            .swap_dims(1, 2);
        // [batch, tokens, channels] -> [batch, 1 head, tokens, channels]
        let heads = |t: Tensor<B, 3>| t.reshape([batch, 1, tokens, channels]);
        let q = heads(self.to_q.forward(h.clone()));
        let k = heads(self.to_k.forward(h.clone()));
        let v = heads(self.to_v.forward(h));
        let out = if tokens <= QUERY_CHUNK {
            attention(q, k, v, None, false, imp)
        } else {
            let chunks = (0..tokens)
                .step_by(QUERY_CHUNK)
                .map(|start| {
                    let len = QUERY_CHUNK.min(tokens - start);
                    attention(
                        q.clone().narrow(2, start, len),
                        k.clone(),
                        v.clone(),
                        None,
                        false,
                        imp,
                    )
                })
                .collect();
            Tensor::cat(chunks, 2)
        };
        let out = self.to_out.forward(out.reshape([batch, tokens, channels]));
        out.swap_dims(1, 2)
            .reshape([batch, channels, height, width])
            + x
    }
}
