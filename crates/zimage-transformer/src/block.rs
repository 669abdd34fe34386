use burn::tensor::activation::silu;
use burn::tensor::{Bool, Tensor};
use zimage_nn::attention::attention;
use zimage_nn::ZBackend;
use zimage_nn::{reshape, silu_mul, AttentionImpl, CheckpointError, Linear, RmsNorm, Weights};

use crate::ZImageTransformerConfig;

/// diffusers builds the q/k norms with a fixed eps, whatever `norm_eps` says.
const QK_NORM_EPS: f64 = 1e-5;

/// What every block of one pass shares: rotation, key-padding mask and attention choice.
#[derive(Debug, Clone)]
pub struct SequenceContext<B: ZBackend> {
    pub rope: zimage_nn::Rotary<B>,
    /// `[batch, tokens]`, `true` for real tokens; `None` when no item is batch-padded.
    pub key_valid: Option<Tensor<B, 2, Bool>>,
    pub attention: AttentionImpl,
}

/// Self-attention with per-head RMSNorm on q and k, then RoPE (`attention` in diffusers).
#[derive(Debug, Clone)]
pub struct Attention<B: ZBackend> {
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    /// `to_out.0` (`to_out.1` is a dropout).
    pub to_out: Linear<B>,
    pub norm_q: Option<RmsNorm<B>>,
    pub norm_k: Option<RmsNorm<B>>,
    pub heads: usize,
}

impl<B: ZBackend> Attention<B> {
    pub fn load(
        w: &Weights<B>,
        dim: usize,
        heads: usize,
        qk_norm: bool,
    ) -> Result<Self, CheckpointError> {
        let head_dim = dim / heads;
        let norm = |name: &str| -> Result<Option<RmsNorm<B>>, CheckpointError> {
            qk_norm
                .then(|| RmsNorm::load(&w.pp(name), head_dim, QK_NORM_EPS))
                .transpose()
        };
        Ok(Self {
            to_q: Linear::load(&w.pp("to_q"), dim, dim, false)?,
            to_k: Linear::load(&w.pp("to_k"), dim, dim, false)?,
            to_v: Linear::load(&w.pp("to_v"), dim, dim, false)?,
            to_out: Linear::load(&w.pp("to_out").pp(0), dim, dim, false)?,
            norm_q: norm("norm_q")?,
            norm_k: norm("norm_k")?,
            heads,
        })
    }

    /// # Shapes
    /// `[batch, tokens, dim]` -> `[batch, tokens, dim]`
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &SequenceContext<B>) -> Tensor<B, 3> {
        let [batch, tokens, dim] = x.dims();
        let split = |t: Tensor<B, 3>| reshape(t, [batch, tokens, self.heads, dim / self.heads]);
        let mut q = split(self.to_q.forward(x.clone()));
        let mut k = split(self.to_k.forward(x.clone()));
        let v = split(self.to_v.forward(x));
        if let Some(norm) = &self.norm_q {
            q = norm.forward(q);
        }
        if let Some(norm) = &self.norm_k {
            k = norm.forward(k);
        }
        let q = ctx.rope.apply(q);
        let k = ctx.rope.apply(k);
        // [batch, heads, tokens, head_dim] for the attention op.
        let out = attention(
            q.swap_dims(1, 2),
            k.swap_dims(1, 2),
            v.swap_dims(1, 2),
            ctx.key_valid.as_ref(),
            false,
            ctx.attention,
        );
        self.to_out
            .forward(reshape(out.swap_dims(1, 2), [batch, tokens, dim]))
    }
}

/// SwiGLU: `w2(silu(w1 x) * w3 x)`.
#[derive(Debug, Clone)]
pub struct FeedForward<B: ZBackend> {
    pub w1: Linear<B>,
    pub w2: Linear<B>,
    pub w3: Linear<B>,
}

impl<B: ZBackend> FeedForward<B> {
    pub fn load(w: &Weights<B>, dim: usize, hidden: usize) -> Result<Self, CheckpointError> {
        Ok(Self {
            w1: Linear::load(&w.pp("w1"), dim, hidden, false)?,
            w2: Linear::load(&w.pp("w2"), hidden, dim, false)?,
            w3: Linear::load(&w.pp("w3"), dim, hidden, false)?,
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.w2
            .forward(silu_mul(self.w1.forward(x.clone()), self.w3.forward(x)))
    }
}

/// `ZImageTransformerBlock`: sandwich-normed attention and SwiGLU, optionally modulated by the
/// timestep (`layers.*` and `noise_refiner.*` are; `context_refiner.*` is not).
#[derive(Debug, Clone)]
pub struct ZImageTransformerBlock<B: ZBackend> {
    pub attention: Attention<B>,
    pub feed_forward: FeedForward<B>,
    pub attention_norm1: RmsNorm<B>,
    pub attention_norm2: RmsNorm<B>,
    pub ffn_norm1: RmsNorm<B>,
    pub ffn_norm2: RmsNorm<B>,
    /// `adaLN_modulation.0`: adaLN width -> 4 * dim, with no activation before it.
    pub modulation: Option<Linear<B>>,
}

impl<B: ZBackend> ZImageTransformerBlock<B> {
    pub fn load(
        w: &Weights<B>,
        config: &ZImageTransformerConfig,
        modulated: bool,
    ) -> Result<Self, CheckpointError> {
        let dim = config.dim;
        let eps = config.norm_eps;
        Ok(Self {
            attention: Attention::load(&w.pp("attention"), dim, config.n_heads, config.qk_norm)?,
            feed_forward: FeedForward::load(&w.pp("feed_forward"), dim, config.ffn_hidden_dim())?,
            attention_norm1: RmsNorm::load(&w.pp("attention_norm1"), dim, eps)?,
            attention_norm2: RmsNorm::load(&w.pp("attention_norm2"), dim, eps)?,
            ffn_norm1: RmsNorm::load(&w.pp("ffn_norm1"), dim, eps)?,
            ffn_norm2: RmsNorm::load(&w.pp("ffn_norm2"), dim, eps)?,
            modulation: if modulated {
                Some(Linear::load(
                    &w.pp("adaLN_modulation").pp(0),
                    config.adaln_dim(),
                    4 * dim,
                    true,
                )?)
            } else {
                None
            },
        })
    }

    /// `adaln`: `[batch, adaln_dim]`, required by modulated blocks.
    ///
    /// # Shapes
    /// `[batch, tokens, dim]` -> `[batch, tokens, dim]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &SequenceContext<B>,
        adaln: Option<&Tensor<B, 2>>,
    ) -> Tensor<B, 3> {
        match (&self.modulation, adaln) {
            (Some(modulation), Some(c)) => {
                // Chunk order: scale_msa, gate_msa, scale_mlp, gate_mlp; no shift.
                let [scale_msa, gate_msa, scale_mlp, gate_mlp]: [Tensor<B, 2>; 4] = modulation
                    .forward(c.clone())
                    .chunk(4, 1)
                    .try_into()
                    .expect("chunk(4) of a 4*dim tensor gives four parts");
                let attn = self.attention.forward(
                    self.attention_norm1
                        .forward_scaled(x.clone(), &scale_msa.add_scalar(1.0)),
                    ctx,
                );
                let x = self.attention_norm2.add_to(x, attn, Some(&gate_msa.tanh()));
                let ffn = self.feed_forward.forward(
                    self.ffn_norm1
                        .forward_scaled(x.clone(), &scale_mlp.add_scalar(1.0)),
                );
                self.ffn_norm2.add_to(x, ffn, Some(&gate_mlp.tanh()))
            }
            _ => {
                let attn = self
                    .attention
                    .forward(self.attention_norm1.forward(x.clone()), ctx);
                let x = self.attention_norm2.add_to(x, attn, None);
                let ffn = self.feed_forward.forward(self.ffn_norm1.forward(x.clone()));
                self.ffn_norm2.add_to(x, ffn, None)
            }
        }
    }
}

/// `all_final_layer.{p}-{pF}`: `LayerNorm` without affine (eps 1e-6) scaled by
/// `1 + Linear(SiLU(c))`, then a Linear to the patch width.
#[derive(Debug, Clone)]
pub struct FinalLayer<B: ZBackend> {
    /// `adaLN_modulation.1` (index 0 is the SiLU).
    pub modulation: Linear<B>,
    pub linear: Linear<B>,
}

const FINAL_NORM_EPS: f64 = 1e-6;

impl<B: ZBackend> FinalLayer<B> {
    pub fn load(
        w: &Weights<B>,
        dim: usize,
        adaln_dim: usize,
        out: usize,
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            modulation: Linear::load(&w.pp("adaLN_modulation").pp(1), adaln_dim, dim, true)?,
            linear: Linear::load(&w.pp("linear"), dim, out, true)?,
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>, c: &Tensor<B, 2>) -> Tensor<B, 3> {
        let scale = self
            .modulation
            .forward(silu(c.clone()))
            .add_scalar(1.0)
            .unsqueeze_dim::<3>(1);
        self.linear
            .forward(zimage_nn::layer_norm(x, FINAL_NORM_EPS) * scale)
    }
}
