use burn::tensor::activation::silu;
use burn::tensor::{DType, Tensor, TensorData};
use zimage_nn::ZBackend;
use zimage_nn::{CheckpointError, Linear, RmsNorm, Weights};

/// Width of the sinusoidal timestep features.
const FREQUENCY_EMBEDDING_SIZE: usize = 256;
/// Hidden width of the timestep MLP.
const TIMESTEP_MID_SIZE: usize = 1024;

/// `t_embedder`: sinusoidal features of the (scaled) timestep through a two-layer MLP.
#[derive(Debug, Clone)]
pub struct TimestepEmbedder<B: ZBackend> {
    /// `mlp.0`: 256 -> 1024.
    pub mlp_0: Linear<B>,
    /// `mlp.2`: 1024 -> adaLN width (`mlp.1` is the SiLU between them).
    pub mlp_2: Linear<B>,
}

impl<B: ZBackend> TimestepEmbedder<B> {
    pub fn load(w: &Weights<B>, out_size: usize) -> Result<Self, CheckpointError> {
        let mlp = w.pp("mlp");
        Ok(Self {
            mlp_0: Linear::load(
                &mlp.pp(0),
                FREQUENCY_EMBEDDING_SIZE,
                TIMESTEP_MID_SIZE,
                true,
            )?,
            mlp_2: Linear::load(&mlp.pp(2), TIMESTEP_MID_SIZE, out_size, true)?,
        })
    }

    /// `t`: already multiplied by `t_scale`. Returns `[batch, out_size]` in `dtype`.
    pub fn forward(&self, t: &[f32], device: &B::Device, dtype: DType) -> Tensor<B, 2> {
        let features = timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE);
        let data = TensorData::new(features, [t.len(), FREQUENCY_EMBEDDING_SIZE]);
        let x = Tensor::<B, 2>::from_data(data, (device, DType::F32)).cast(dtype);
        self.mlp_2.forward(silu(self.mlp_0.forward(x)))
    }
}

/// `[cos(t f_k), sin(t f_k)]` with `f_k = exp(-ln(10000) k / half)`, all in f32 in the order
/// diffusers evaluates it (`TimestepEmbedder.timestep_embedding`, autocast off).
pub fn timestep_embedding(t: &[f32], dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let log_max_period = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|k| (log_max_period * k as f32 / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(t.len() * dim);
    for &ti in t {
        let args: Vec<f32> = freqs.iter().map(|&f| ti * f).collect();
        out.extend(args.iter().map(|a| a.cos()));
        out.extend(args.iter().map(|a| a.sin()));
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}

/// `cap_embedder`: RMSNorm of the text features, then a Linear to the model width.
#[derive(Debug, Clone)]
pub struct CaptionEmbedder<B: ZBackend> {
    /// `cap_embedder.0`
    pub norm: RmsNorm<B>,
    /// `cap_embedder.1`
    pub linear: Linear<B>,
}

impl<B: ZBackend> CaptionEmbedder<B> {
    pub fn load(
        w: &Weights<B>,
        cap_feat_dim: usize,
        dim: usize,
        eps: f64,
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            norm: RmsNorm::load(&w.pp(0), cap_feat_dim, eps)?,
            linear: Linear::load(&w.pp(1), cap_feat_dim, dim, true)?,
        })
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear.forward(self.norm.forward(x))
    }
}
