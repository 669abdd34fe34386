use burn::tensor::{Bool, Tensor};
use zimage_nn::attention::attention;
use zimage_nn::ZBackend;
use zimage_nn::{reshape, silu_mul, AttentionImpl, CheckpointError, Linear, RmsNorm, Weights};

use crate::Qwen3Config;

/// What every layer of one pass shares.
#[derive(Debug, Clone)]
pub struct LayerContext<B: ZBackend> {
    pub rope: zimage_nn::Rotary<B>,
    /// `[batch, tokens]`, `true` for real tokens; `None` when no prompt is padded.
    pub key_valid: Option<Tensor<B, 2, Bool>>,
    pub attention: AttentionImpl,
}

/// `self_attn`: grouped-query causal attention with a per-head RMSNorm on queries and keys
/// (`q_norm`, `k_norm`) before RoPE.
#[derive(Debug, Clone)]
pub struct Qwen3Attention<B: ZBackend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub q_norm: RmsNorm<B>,
    pub k_norm: RmsNorm<B>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl<B: ZBackend> Qwen3Attention<B> {
    pub fn load(w: &Weights<B>, config: &Qwen3Config) -> Result<Self, CheckpointError> {
        let hidden = config.hidden_size;
        let (heads, kv_heads, head_dim) = (
            config.num_attention_heads,
            config.num_key_value_heads(),
            config.head_dim(),
        );
        let bias = config.attention_bias;
        let eps = config.rms_norm_eps;
        Ok(Self {
            q_proj: Linear::load(&w.pp("q_proj"), hidden, heads * head_dim, bias)?,
            k_proj: Linear::load(&w.pp("k_proj"), hidden, kv_heads * head_dim, bias)?,
            v_proj: Linear::load(&w.pp("v_proj"), hidden, kv_heads * head_dim, bias)?,
            o_proj: Linear::load(&w.pp("o_proj"), heads * head_dim, hidden, bias)?,
            q_norm: RmsNorm::load(&w.pp("q_norm"), head_dim, eps)?,
            k_norm: RmsNorm::load(&w.pp("k_norm"), head_dim, eps)?,
            heads,
            kv_heads,
            head_dim,
        })
    }

    /// # Shapes
    /// `[batch, tokens, hidden]` -> `[batch, tokens, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &LayerContext<B>) -> Tensor<B, 3> {
        let [batch, tokens, _] = x.dims();
        let (heads, kv_heads, head_dim) = (self.heads, self.kv_heads, self.head_dim);
        // [batch, tokens, heads, head_dim]: the norms and the rotation act per head.
        let q = reshape(
            self.q_proj.forward(x.clone()),
            [batch, tokens, heads, head_dim],
        );
        let k = reshape(
            self.k_proj.forward(x.clone()),
            [batch, tokens, kv_heads, head_dim],
        );
        let v = reshape(self.v_proj.forward(x), [batch, tokens, kv_heads, head_dim]);
        let q = ctx.rope.apply(self.q_norm.forward(q));
        let k = ctx.rope.apply(self.k_norm.forward(k));
        // [batch, heads, tokens, head_dim]; attention maps query heads onto key/value heads (GQA).
        let out = attention(
            q.swap_dims(1, 2),
            k.swap_dims(1, 2),
            v.swap_dims(1, 2),
            ctx.key_valid.as_ref(),
            true,
            ctx.attention,
        );
        self.o_proj.forward(reshape(
            out.swap_dims(1, 2),
            [batch, tokens, heads * head_dim],
        ))
    }
}

/// `mlp`: SwiGLU, `down_proj(silu(gate_proj(x)) * up_proj(x))`.
#[derive(Debug, Clone)]
pub struct Qwen3Mlp<B: ZBackend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: ZBackend> Qwen3Mlp<B> {
    pub fn load(
        w: &Weights<B>,
        hidden: usize,
        intermediate: usize,
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            gate_proj: Linear::load(&w.pp("gate_proj"), hidden, intermediate, false)?,
            up_proj: Linear::load(&w.pp("up_proj"), hidden, intermediate, false)?,
            down_proj: Linear::load(&w.pp("down_proj"), intermediate, hidden, false)?,
        })
    }

    /// # Shapes
    /// `[batch, tokens, hidden]` -> `[batch, tokens, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down_proj.forward(silu_mul(
            self.gate_proj.forward(x.clone()),
            self.up_proj.forward(x),
        ))
    }
}

/// `layers.{i}`: pre-norm attention and MLP, each added to the residual stream.
#[derive(Debug, Clone)]
pub struct Qwen3DecoderLayer<B: ZBackend> {
    pub self_attn: Qwen3Attention<B>,
    pub mlp: Qwen3Mlp<B>,
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: ZBackend> Qwen3DecoderLayer<B> {
    pub fn load(w: &Weights<B>, config: &Qwen3Config) -> Result<Self, CheckpointError> {
        let hidden = config.hidden_size;
        let eps = config.rms_norm_eps;
        Ok(Self {
            self_attn: Qwen3Attention::load(&w.pp("self_attn"), config)?,
            mlp: Qwen3Mlp::load(&w.pp("mlp"), hidden, config.intermediate_size)?,
            input_layernorm: RmsNorm::load(&w.pp("input_layernorm"), hidden, eps)?,
            post_attention_layernorm: RmsNorm::load(
                &w.pp("post_attention_layernorm"),
                hidden,
                eps,
            )?,
        })
    }

    /// # Shapes
    /// `[batch, tokens, hidden]` -> `[batch, tokens, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &LayerContext<B>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.input_layernorm.forward(x), ctx);
        x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x))
    }
}
