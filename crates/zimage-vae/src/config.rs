use std::path::Path;

use serde::{Deserialize, Deserializer};

use crate::{TilingConfig, VaeError};

/// The only down block type the Flux-style autoencoder uses.
pub const DOWN_BLOCK_TYPE: &str = "DownEncoderBlock2D";
/// The only up block type the Flux-style autoencoder uses.
pub const UP_BLOCK_TYPE: &str = "UpDecoderBlock2D";

/// `vae/config.json` of a diffusers `AutoencoderKL`. Absent fields take the defaults of
/// `AutoencoderKL.__init__` (a one-block SD-style VAE), which are *not* the published Z-Image values:
/// use [`AutoencoderKLConfig::z_image`] for those.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// One per block; only `DownEncoderBlock2D` exists in this architecture.
    pub down_block_types: Vec<String>,
    /// One per block; only `UpDecoderBlock2D` exists in this architecture.
    pub up_block_types: Vec<String>,
    /// Channels of each encoder block (the decoder uses them reversed). Any number of blocks;
    /// each block but the last halves the resolution.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// `silu` (or its alias `swish`): the only activation this implementation has.
    pub act_fn: String,
    pub latent_channels: usize,
    /// Groups of every GroupNorm; divides every entry of `block_out_channels`.
    pub norm_num_groups: usize,
    /// Training resolution; also the default tile size of tiled encode and decode. A list
    /// (`[h, w]`) is read as its first entry, as diffusers does for the latent tile size.
    #[serde(deserialize_with = "int_or_first")]
    pub sample_size: usize,
    /// Latents are `(z - shift_factor) * scaling_factor` for the diffusion model.
    pub scaling_factor: f64,
    /// `null` is no shift.
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics some other pipelines use; Z-Image leaves them `null`.
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    /// diffusers pipelines run the VAE in f32 when this is set (a hint for callers).
    pub force_upcast: bool,
    /// A 1x1 conv on the moments after the encoder (`quant_conv`).
    pub use_quant_conv: bool,
    /// A 1x1 conv on the latents before the decoder (`post_quant_conv`).
    pub use_post_quant_conv: bool,
    /// `false` drops the attention of both mid blocks.
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec![DOWN_BLOCK_TYPE.into()],
            up_block_types: vec![UP_BLOCK_TYPE.into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

/// `sample_size` is an int in most configs, `[h, w]` in a few.
fn int_or_first<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrList {
        Int(usize),
        List(Vec<usize>),
    }
    match IntOrList::deserialize(deserializer)? {
        IntOrList::Int(n) => Ok(n),
        IntOrList::List(list) => list
            .first()
            .copied()
            .ok_or_else(|| serde::de::Error::custom("sample_size is an empty list")),
    }
}

/// More blocks than this would overflow the downscale factor's arithmetic; no model has them.
const MAX_BLOCKS: usize = 16;

impl AutoencoderKLConfig {
    /// The published Z-Image (Turbo and base) VAE: the FLUX.1 autoencoder layout.
    pub fn z_image() -> Self {
        let blocks = 4;
        Self {
            down_block_types: vec![DOWN_BLOCK_TYPE.into(); blocks],
            up_block_types: vec![UP_BLOCK_TYPE.into(); blocks],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 16,
            sample_size: 1024,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
            use_quant_conv: false,
            use_post_quant_conv: false,
            ..Self::default()
        }
    }

    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, VaeError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| VaeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            VaeError::Config { reason, .. } => VaeError::Config {
                path: Some(path.to_path_buf()),
                reason,
            },
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self, VaeError> {
        let config: Self = serde_json::from_str(text).map_err(|e| VaeError::Config {
            path: None,
            reason: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn num_blocks(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Image pixels per latent pixel along each side: `2^(blocks - 1)`.
    pub fn downscale_factor(&self) -> usize {
        1 << self.num_blocks().saturating_sub(1)
    }

    /// The shape of the largest activation of an untiled encode (`decode == false`) or decode of
    /// `batch` images of `height x width` pixels: a feature map, or the mid-block attention's
    /// `[batch, 1, tokens, tokens]` scores when larger.
    ///
    /// Level `j` of the U-shape holds `height * width / 4^j` pixels. The encoder has the channels of
    /// block `j` there and, entering it, those of block `j - 1`; the decoder has those of block
    /// `j` and, leaving the upsampling of the level below, those of block `j + 1`.
    pub fn largest_activation(
        &self,
        batch: usize,
        height: usize,
        width: usize,
        decode: bool,
    ) -> [usize; 4] {
        let ch = &self.block_out_channels;
        let mut largest = [batch, 0, 0, 0];
        let elements = |shape: &[usize; 4]| shape.iter().product::<usize>();
        for j in 0..ch.len() {
            let neighbour = if decode {
                ch.get(j + 1)
            } else {
                j.checked_sub(1).and_then(|i| ch.get(i))
            };
            let channels = ch[j].max(neighbour.copied().unwrap_or(0));
            let shape = [batch, channels, height >> j, width >> j];
            if elements(&shape) > elements(&largest) {
                largest = shape;
            }
        }
        if self.mid_block_add_attention {
            let f = self.downscale_factor();
            let tokens = (height / f) * (width / f);
            let scores = [batch, 1, tokens, tokens];
            if elements(&scores) > elements(&largest) {
                largest = scores;
            }
        }
        largest
    }

    /// `shift_factor`, 0 when the config has none.
    pub fn shift(&self) -> f64 {
        self.shift_factor.unwrap_or(0.0)
    }

    /// The tiling diffusers' `enable_tiling()` uses for this config: tiles of `sample_size` pixels,
    /// a quarter of them overlapping.
    pub fn default_tiling(&self) -> TilingConfig {
        TilingConfig::for_sample_size(self.sample_size, self)
    }

    /// Checks what diffusers would reject and what this implementation supports.
    pub fn validate(&self) -> Result<(), VaeError> {
        let fail = |reason: String| Err(VaeError::Config { path: None, reason });
        let blocks = self.num_blocks();
        if blocks == 0 || blocks > MAX_BLOCKS {
            return fail(format!(
                "block_out_channels {:?} must have 1 to {MAX_BLOCKS} entries",
                self.block_out_channels
            ));
        }
        if self.down_block_types.len() != blocks || self.up_block_types.len() != blocks {
            return fail(format!(
                "{} down_block_types and {} up_block_types for {blocks} block_out_channels; they must be equal",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(other) = self.down_block_types.iter().find(|t| *t != DOWN_BLOCK_TYPE) {
            return fail(format!(
                "down block type {other:?} is not supported (only {DOWN_BLOCK_TYPE})"
            ));
        }
        if let Some(other) = self.up_block_types.iter().find(|t| *t != UP_BLOCK_TYPE) {
            return fail(format!(
                "up block type {other:?} is not supported (only {UP_BLOCK_TYPE})"
            ));
        }
        if !matches!(self.act_fn.as_str(), "silu" | "swish") {
            return fail(format!(
                "act_fn {:?} is not supported (only \"silu\")",
                self.act_fn
            ));
        }
        if self.layers_per_block == 0 {
            return fail("layers_per_block must be at least 1".into());
        }
        for (name, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("sample_size", self.sample_size),
        ] {
            if value == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        let groups = self.norm_num_groups;
        if groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|&c| c == 0 || c % groups != 0)
        {
            return fail(format!(
                "norm_num_groups {groups} must divide every entry of block_out_channels {:?}",
                self.block_out_channels
            ));
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return fail(format!(
                "scaling_factor {} must be finite and non-zero",
                self.scaling_factor
            ));
        }
        if !self.shift().is_finite() {
            return fail(format!("shift_factor {} must be finite", self.shift()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_diffusers_defaults() {
        let config = AutoencoderKLConfig::from_json("{}").unwrap();
        assert_eq!(config.block_out_channels, vec![64]);
        assert_eq!(config.layers_per_block, 1);
        assert_eq!(config.latent_channels, 4);
        assert!(config.use_quant_conv && config.use_post_quant_conv);
        assert_eq!(config.downscale_factor(), 1);
        assert_eq!(config.shift(), 0.0);
    }

    #[test]
    fn published_config_parses() {
        let json = r#"{"_class_name": "AutoencoderKL", "_diffusers_version": "0.37.0", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D",
            "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"], "force_upcast": true,
            "in_channels": 3, "latent_channels": 16, "latents_mean": null, "latents_std": null,
            "layers_per_block": 2, "mid_block_add_attention": true, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D",
            "UpDecoderBlock2D"], "use_post_quant_conv": false, "use_quant_conv": false}"#;
        let config = AutoencoderKLConfig::from_json(json).unwrap();
        assert_eq!(config, AutoencoderKLConfig::z_image());
        assert_eq!(config.downscale_factor(), 8);
    }

    #[test]
    fn sample_size_list_reads_first_entry() {
        let config = AutoencoderKLConfig::from_json(r#"{"sample_size": [512, 768]}"#).unwrap();
        assert_eq!(config.sample_size, 512);
    }

    #[test]
    fn malformed_configs_are_rejected() {
        for json in [
            r#"{"block_out_channels": []}"#,
            r#"{"block_out_channels": [64, 128]}"#,
            r#"{"norm_num_groups": 3}"#,
            r#"{"act_fn": "gelu"}"#,
            r#"{"down_block_types": ["AttnDownEncoderBlock2D"]}"#,
            r#"{"layers_per_block": 0}"#,
            r#"{"latent_channels": 0}"#,
            r#"{"scaling_factor": 0.0}"#,
            r#"{"block_out_channels": "wide"}"#,
            r#"{"sample_size": []}"#,
            "not json",
        ] {
            let err = AutoencoderKLConfig::from_json(json).unwrap_err();
            assert!(matches!(err, VaeError::Config { .. }), "{json}: {err}");
        }
    }
}
