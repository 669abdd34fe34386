use std::path::Path;

use serde::Deserialize;

use crate::TransformerError;

/// `transformer/config.json` of a Z-Image checkpoint. Absent fields take diffusers' defaults
/// (`ZImageTransformer2DModel.__init__`), which are *not* always the published values: the
/// published Turbo config sets `axes_lens` to `[1536, 512, 512]`, for instance.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ZImageTransformerConfig {
    /// Spatial patch sizes; `all_patch_size[i]` pairs with `all_f_patch_size[i]`.
    pub all_patch_size: Vec<usize>,
    /// Temporal (frame) patch sizes.
    pub all_f_patch_size: Vec<usize>,
    /// Latent channels (also the output channels).
    pub in_channels: usize,
    /// Hidden size.
    pub dim: usize,
    /// Main (joint) blocks.
    pub n_layers: usize,
    /// Blocks in each of `noise_refiner` and `context_refiner`.
    pub n_refiner_layers: usize,
    pub n_heads: usize,
    /// Present in the checkpoint config; diffusers ignores it (keys and values have `n_heads`).
    pub n_kv_heads: usize,
    pub norm_eps: f64,
    pub qk_norm: bool,
    /// Width of the text-encoder features.
    pub cap_feat_dim: usize,
    /// Only the unreleased Omni variant sets it; refused when present (see `validate`).
    pub siglip_feat_dim: Option<usize>,
    pub rope_theta: f64,
    /// Timesteps in [0, 1] are multiplied by this before the sinusoidal embedding.
    pub t_scale: f64,
    /// RoPE dimensions per axis (frame, height, width); they sum to the head dimension.
    pub axes_dims: Vec<usize>,
    /// RoPE table length per axis (largest position + 1).
    pub axes_lens: Vec<usize>,
}

impl Default for ZImageTransformerConfig {
    fn default() -> Self {
        Self {
            all_patch_size: vec![2],
            all_f_patch_size: vec![1],
            in_channels: 16,
            dim: 3840,
            n_layers: 30,
            n_refiner_layers: 2,
            n_heads: 30,
            n_kv_heads: 30,
            norm_eps: 1e-5,
            qk_norm: true,
            cap_feat_dim: 2560,
            siglip_feat_dim: None,
            rope_theta: 256.0,
            t_scale: 1000.0,
            axes_dims: vec![32, 48, 48],
            axes_lens: vec![1024, 512, 512],
        }
    }
}

/// Width of the timestep conditioning (`min(dim, 256)` in diffusers).
pub(crate) const ADALN_EMBED_DIM: usize = 256;
/// Caption and image token runs are padded to a multiple of this with learned pad tokens.
pub const SEQ_MULTI_OF: usize = 32;

impl ZImageTransformerConfig {
    /// The published Z-Image-Turbo transformer.
    pub fn z_image_turbo() -> Self {
        Self {
            axes_lens: vec![1536, 512, 512],
            ..Self::default()
        }
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TransformerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TransformerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            TransformerError::Config { reason, .. } => TransformerError::Config {
                path: Some(path.to_path_buf()),
                reason,
            },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self, TransformerError> {
        let config: Self = serde_json::from_str(text).map_err(|e| TransformerError::Config {
            path: None,
            reason: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// SwiGLU hidden width, `int(dim / 3 * 8)` as diffusers computes it.
    pub fn ffn_hidden_dim(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }

    /// Width of the timestep conditioning vector.
    pub fn adaln_dim(&self) -> usize {
        self.dim.min(ADALN_EMBED_DIM)
    }

    /// Length of one patch vector for the `index`-th patch size: `pF * p * p * C`.
    pub fn patch_dim(&self, index: usize) -> usize {
        self.all_f_patch_size[index] * self.all_patch_size[index].pow(2) * self.in_channels
    }

    /// The module-dict key of a patch size, `"{p}-{pF}"`.
    pub fn patch_key(&self, index: usize) -> String {
        format!(
            "{}-{}",
            self.all_patch_size[index], self.all_f_patch_size[index]
        )
    }

    /// Checks the relations diffusers asserts, and what this implementation supports.
    pub fn validate(&self) -> Result<(), TransformerError> {
        let fail = |reason: String| Err(TransformerError::Config { path: None, reason });
        if self.n_heads == 0 || self.dim % self.n_heads != 0 {
            return fail(format!(
                "dim {} is not a multiple of n_heads {}",
                self.dim, self.n_heads
            ));
        }
        let axes_sum: usize = self.axes_dims.iter().sum();
        if axes_sum != self.head_dim() {
            return fail(format!(
                "head_dim {} (dim {} / n_heads {}) differs from the sum of axes_dims {:?} = {axes_sum}",
                self.head_dim(),
                self.dim,
                self.n_heads,
                self.axes_dims
            ));
        }
        if self.axes_dims.len() != 3 || self.axes_lens.len() != 3 {
            return fail(format!(
                "axes_dims {:?} and axes_lens {:?} must have three entries (frame, height, width)",
                self.axes_dims, self.axes_lens
            ));
        }
        if self.axes_dims.iter().any(|d| d % 2 != 0) {
            return fail(format!("axes_dims {:?} must be even", self.axes_dims));
        }
        if self.all_patch_size.is_empty()
            || self.all_patch_size.len() != self.all_f_patch_size.len()
        {
            return fail(format!(
                "all_patch_size {:?} and all_f_patch_size {:?} must be non-empty and of equal length",
                self.all_patch_size, self.all_f_patch_size
            ));
        }
        if self
            .all_patch_size
            .iter()
            .chain(&self.all_f_patch_size)
            .any(|&p| p == 0)
        {
            return fail("patch sizes must be positive".into());
        }
        if self.siglip_feat_dim.is_some() {
            return fail("siglip_feat_dim is set: the Omni variant is not supported".into());
        }
        Ok(())
    }
}
