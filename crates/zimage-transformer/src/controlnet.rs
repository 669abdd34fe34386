//! The Z-Image ControlNet (`ZImageControlNetModel` in diffusers): alibaba-pai's
//! Z-Image-Turbo-Fun-Controlnet-Union, 1.0 and 2.x.
//!
//! It runs beside the transformer and reuses its timestep, patch and caption embedders, pad
//! tokens, noise and context refiners (diffusers' `from_transformer` shares those modules), so
//! its forward takes the transformer. What it adds:
//! - `control_all_x_embedder.{p}-{pF}`: the control context (VAE latents of the control image,
//!   with more channels for 2.x) patchified like the latents and embedded to `dim`;
//! - `control_layers.*`: control blocks at `control_layers_places`. Each is a modulated
//!   transformer block over the control stream `c`; the first also takes the main stream
//!   (`c = before_proj(c) + x`), and each emits a hint `after_proj(c)`;
//! - `control_noise_refiner.*`, whose role depends on the layout
//!   ([`ControlNoiseRefiner`]).
//!
//! The hints, times `controlnet_conditioning_scale`, are added to the transformer's sequence
//! after the main layers they are placed at ([`LayerResiduals`],
//! [`ZImageTransformer2DModel::forward_with_residuals`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};
use zimage_nn::{Checkpoint, CheckpointError, Linear, Precision, WeightMap, Weights, ZBackend};

use crate::block::{SequenceContext, ZImageTransformerBlock};
use crate::checkpoint::{map_controlnet_key, COMFY_PREFIX};
use crate::{LayerResiduals, TransformerError, ZImageTransformer2DModel, ZImageTransformerConfig};

/// What `control_noise_refiner` is (diffusers' `add_control_noise_refiner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlNoiseRefiner {
    /// 2.0: the control layers also run beside the noise refiner, over the image tokens, and
    /// their first hints are added to the refiner's layers; the file's `control_noise_refiner.*`
    /// are not used.
    ControlLayers,
    /// 2.1: `control_noise_refiner.*` are control blocks beside the noise refiner, whose hints are
    /// added to the refiner's layers.
    ControlNoiseRefiner,
}

/// The ControlNet's `config.json` (diffusers' `ZImageControlNetModel.__init__`), or what
/// [`ZImageControlNetConfig::detect`] reads from a single file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ZImageControlNetConfig {
    /// The main layers whose output gets a hint, one per control layer; must start with 0.
    pub control_layers_places: Vec<usize>,
    /// The noise refiner layers whose output gets a hint (2.x); `None` for 1.0.
    pub control_refiner_layers_places: Option<Vec<usize>>,
    /// Channels of the control context: 16 (1.0: the control image's latents) or 33 (2.x: those,
    /// a mask channel and the masked image's latents; zeros past the control latents for
    /// text-to-image).
    pub control_in_dim: usize,
    /// `None` (1.0): `control_noise_refiner.*` are plain transformer blocks run over the control
    /// stream after the noise refiner.
    pub add_control_noise_refiner: Option<ControlNoiseRefiner>,
    pub all_patch_size: Vec<usize>,
    pub all_f_patch_size: Vec<usize>,
    pub dim: usize,
    pub n_refiner_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub norm_eps: f64,
    pub qk_norm: bool,
}

impl Default for ZImageControlNetConfig {
    fn default() -> Self {
        Self {
            control_layers_places: Vec::new(),
            control_refiner_layers_places: None,
            control_in_dim: 0,
            add_control_noise_refiner: None,
            all_patch_size: vec![2],
            all_f_patch_size: vec![1],
            dim: 3840,
            n_refiner_layers: 2,
            n_heads: 30,
            n_kv_heads: 30,
            norm_eps: 1e-5,
            qk_norm: true,
        }
    }
}

fn controlnet_error(file: Option<&Path>, reason: impl Into<String>) -> TransformerError {
    TransformerError::ControlNet {
        file: file.map(Path::to_path_buf),
        reason: reason.into(),
    }
}

impl ZImageControlNetConfig {
    /// Reads a diffusers `config.json` (the `hlky/Z-Image-Turbo-Fun-Controlnet-Union*` repos).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TransformerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TransformerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| controlnet_error(Some(path), e.to_string()))
    }

    pub fn from_json(text: &str) -> Result<Self, TransformerError> {
        serde_json::from_str(text).map_err(|e| controlnet_error(None, e.to_string()))
    }

    /// The release this layout is: "1.0", "2.0" or "2.1".
    pub fn release(&self) -> &'static str {
        match self.add_control_noise_refiner {
            None => "1.0",
            Some(ControlNoiseRefiner::ControlLayers) => "2.0",
            Some(ControlNoiseRefiner::ControlNoiseRefiner) => "2.1",
        }
    }

    /// How many hints the refiner stage makes (none for 1.0).
    fn refiner_hints(&self) -> usize {
        match self.add_control_noise_refiner {
            None => 0,
            Some(ControlNoiseRefiner::ControlLayers) => self.control_layers_places.len(),
            Some(ControlNoiseRefiner::ControlNoiseRefiner) => self.n_refiner_layers,
        }
    }

    /// The config of a single file, as diffusers' single-file loader settles it
    /// (`infer_diffusers_model_type`, then the `hlky/Z-Image-Turbo-Fun-Controlnet-Union*`
    /// configs), without the network:
    /// - `control_in_dim` and `dim` from `control_all_x_embedder.{p}-{pF}.weight`;
    /// - the layout from `control_noise_refiner.*`: plain blocks are 1.0; control blocks (with
    ///   `after_proj`) are 2.1 when `control_noise_refiner.0.before_proj.weight` is non-zero,
    ///   else 2.0 (diffusers' rule); none at all is 2.0;
    /// - `control_layers_places` spread evenly from 0 over the transformer's layers (every 5th of
    ///   30 for 1.0's 6 layers, every 2nd for 2.x's 15, every 10th for the 3 of "lite" files), and
    ///   `control_refiner_layers_places` every refiner layer (`[0, 1]`), as published.
    ///
    /// A file whose control layers do not spread evenly needs its config
    /// ([`ZImageControlNetConfig::from_file`]).
    pub fn detect(
        checkpoint: &Checkpoint,
        base: &ZImageTransformerConfig,
    ) -> Result<Self, TransformerError> {
        let file = checkpoint.origin().to_path_buf();
        let fail = |reason: String| Err(controlnet_error(Some(&file), reason));
        let names: Vec<(&str, &str)> = checkpoint
            .entries()
            .map(|(n, _)| (n, n.strip_prefix(COMFY_PREFIX).unwrap_or(n)))
            .collect();
        let stored = |bare: &str| {
            names
                .iter()
                .find(|(_, b)| *b == bare)
                .and_then(|(n, _)| checkpoint.get(n).map(|e| (*n, e)))
        };
        let patch = base.all_patch_size[0];
        let f_patch = base.all_f_patch_size[0];
        let embedder = format!("control_all_x_embedder.{}.weight", base.patch_key(0));
        let Some((_, entry)) = stored(&embedder) else {
            let has = |prefix: &str| names.iter().any(|(_, b)| b.starts_with(prefix));
            if has("control_all_x_embedder.") {
                return fail(format!(
                    "it has no {embedder}: its control embedder is for another patch size than the transformer's ({patch}x{patch}, {f_patch} frame)"
                ));
            }
            if has("layers.0.") || has("all_x_embedder.") || has("x_embedder.") {
                return fail("this is a Z-Image transformer, not a ControlNet".into());
            }
            return fail(format!(
                "not a Z-Image ControlNet: it has no {embedder} (the Z-Image-Turbo-Fun-Controlnet-Union files have it)"
            ));
        };
        let &[rows, cols] = entry.shape.as_slice() else {
            return fail(format!("{embedder} has shape {:?}, not 2-D", entry.shape));
        };
        if rows != base.dim {
            return fail(format!(
                "it was made for a model of width {rows}, and this transformer's width is {} (a ControlNet for another base model?)",
                base.dim
            ));
        }
        let per_channel = patch * patch * f_patch;
        if cols == 0 || cols % per_channel != 0 {
            return fail(format!(
                "{embedder} takes {cols} inputs, not a multiple of the {per_channel} of a patch"
            ));
        }
        let indices = |prefix: &str| -> BTreeSet<usize> {
            names
                .iter()
                .filter_map(|(_, b)| b.strip_prefix(prefix))
                .filter_map(|rest| rest.split('.').next()?.parse().ok())
                .collect()
        };
        let contiguous = |set: &BTreeSet<usize>, what: &str| -> Result<usize, TransformerError> {
            let count = set.len();
            if set.iter().copied().eq(0..count) {
                Ok(count)
            } else {
                Err(controlnet_error(
                    Some(&file),
                    format!("its {what} blocks are numbered {set:?}, not 0..{count}"),
                ))
            }
        };
        let layers = contiguous(&indices("control_layers."), "control_layers")?;
        if layers == 0 {
            return fail("it has no control_layers.* blocks".into());
        }
        let refiner = contiguous(&indices("control_noise_refiner."), "control_noise_refiner")?;
        let mode = if refiner == 0 {
            Some(ControlNoiseRefiner::ControlLayers)
        } else if stored("control_noise_refiner.0.after_proj.weight").is_some() {
            match stored("control_noise_refiner.0.before_proj.weight") {
                None => Some(ControlNoiseRefiner::ControlLayers),
                Some((name, _)) => {
                    let values = checkpoint.read(name, None, DType::F32)?;
                    let zero = values
                        .to_vec::<f32>()
                        .map_err(|e| controlnet_error(Some(&file), format!("{name}: {e:?}")))?
                        .iter()
                        .all(|&v| v == 0.0);
                    Some(if zero {
                        ControlNoiseRefiner::ControlLayers
                    } else {
                        ControlNoiseRefiner::ControlNoiseRefiner
                    })
                }
            }
        } else {
            None
        };
        let n_heads = match stored("control_layers.0.attention.norm_q.weight")
            .or_else(|| stored("control_layers.0.attention.q_norm.weight"))
        {
            Some((_, e)) if e.shape.len() == 1 && e.shape[0] > 0 && rows % e.shape[0] == 0 => {
                rows / e.shape[0]
            }
            _ => base.n_heads,
        };
        if base.n_layers % layers != 0 {
            return fail(format!(
                "its {layers} control layers do not spread evenly over the transformer's {} layers; give its config.json (control_layers_places)",
                base.n_layers
            ));
        }
        let stride = base.n_layers / layers;
        let n_refiner_layers = if refiner > 0 && mode.is_some() {
            refiner
        } else {
            base.n_refiner_layers
        };
        let mut config = Self {
            control_layers_places: (0..layers).map(|i| i * stride).collect(),
            control_refiner_layers_places: None,
            control_in_dim: cols / per_channel,
            add_control_noise_refiner: mode,
            all_patch_size: base.all_patch_size.clone(),
            all_f_patch_size: base.all_f_patch_size.clone(),
            dim: rows,
            n_refiner_layers,
            n_heads,
            n_kv_heads: n_heads,
            norm_eps: base.norm_eps,
            qk_norm: base.qk_norm,
        };
        if mode.is_some() {
            let hints = config.refiner_hints().min(base.n_refiner_layers);
            config.control_refiner_layers_places = Some((0..hints).collect());
        }
        config.validate_for(base).map_err(|e| with_file(e, &file))?;
        Ok(config)
    }

    /// Checks that this ControlNet fits `base` (the transformer it runs with) and what
    /// diffusers asserts or would fail on.
    pub fn validate_for(&self, base: &ZImageTransformerConfig) -> Result<(), TransformerError> {
        let fail = |reason: String| Err(controlnet_error(None, reason));
        if self.dim != base.dim || self.n_heads != base.n_heads {
            return fail(format!(
                "it is {} wide with {} heads, the transformer {} with {} (a ControlNet for another base model?)",
                self.dim, self.n_heads, base.dim, base.n_heads
            ));
        }
        if self.qk_norm != base.qk_norm || self.norm_eps != base.norm_eps {
            return fail(format!(
                "its qk_norm {} / norm_eps {} differ from the transformer's {} / {}",
                self.qk_norm, self.norm_eps, base.qk_norm, base.norm_eps
            ));
        }
        if self.all_patch_size.first() != base.all_patch_size.first()
            || self.all_f_patch_size.first() != base.all_f_patch_size.first()
            || self.all_patch_size.len() != self.all_f_patch_size.len()
        {
            return fail(format!(
                "its patch sizes {:?} / {:?} do not start with the transformer's {:?} / {:?}",
                self.all_patch_size,
                self.all_f_patch_size,
                base.all_patch_size,
                base.all_f_patch_size
            ));
        }
        let places = &self.control_layers_places;
        if places.first() != Some(&0) {
            return fail(format!(
                "control_layers_places {places:?} must start with 0 (the block with before_proj)"
            ));
        }
        let unique: BTreeSet<_> = places.iter().collect();
        if unique.len() != places.len() {
            return fail(format!("control_layers_places {places:?} repeats a layer"));
        }
        if let Some(&k) = places.iter().find(|&&k| k >= base.n_layers) {
            return fail(format!(
                "control_layers_places {places:?} names layer {k}, but the transformer has {} layers",
                base.n_layers
            ));
        }
        match (
            &self.add_control_noise_refiner,
            &self.control_refiner_layers_places,
        ) {
            (None, _) => {}
            (Some(_), None) => {
                return fail(format!(
                    "the {} layout needs control_refiner_layers_places",
                    self.release()
                ))
            }
            (Some(_), Some(refiner)) => {
                let unique: BTreeSet<_> = refiner.iter().collect();
                if unique.len() != refiner.len() {
                    return fail(format!(
                        "control_refiner_layers_places {refiner:?} repeats a layer"
                    ));
                }
                if let Some(&k) = refiner.iter().find(|&&k| k >= base.n_refiner_layers) {
                    return fail(format!(
                        "control_refiner_layers_places {refiner:?} names refiner layer {k}, but the transformer has {}",
                        base.n_refiner_layers
                    ));
                }
                if refiner.len() > self.refiner_hints() {
                    return fail(format!(
                        "control_refiner_layers_places {refiner:?} asks for {} hints, and the refiner stage makes {}",
                        refiner.len(),
                        self.refiner_hints()
                    ));
                }
            }
        }
        if self.add_control_noise_refiner == Some(ControlNoiseRefiner::ControlNoiseRefiner)
            && self.n_refiner_layers == 0
        {
            return fail("the 2.1 layout needs control_noise_refiner blocks".into());
        }
        if self.control_in_dim < base.in_channels {
            return fail(format!(
                "control_in_dim {} is less than the transformer's {} latent channels",
                self.control_in_dim, base.in_channels
            ));
        }
        Ok(())
    }

    /// The transformer config the control blocks are built with: the base's, which they must
    /// match ([`Self::validate_for`]).
    fn block_config(&self, base: &ZImageTransformerConfig) -> ZImageTransformerConfig {
        ZImageTransformerConfig {
            dim: self.dim,
            n_heads: self.n_heads,
            norm_eps: self.norm_eps,
            qk_norm: self.qk_norm,
            ..base.clone()
        }
    }
}

fn with_file(error: TransformerError, file: &Path) -> TransformerError {
    match error {
        TransformerError::ControlNet { file: None, reason } => TransformerError::ControlNet {
            file: Some(file.to_path_buf()),
            reason,
        },
        other => other,
    }
}

/// `ZImageControlTransformerBlock`: a modulated transformer block over the control stream,
/// with `before_proj` (the first block only) and `after_proj` (the hint).
#[derive(Debug, Clone)]
pub struct ZImageControlTransformerBlock<B: ZBackend> {
    pub block: ZImageTransformerBlock<B>,
    pub before_proj: Option<Linear<B>>,
    pub after_proj: Linear<B>,
}

impl<B: ZBackend> ZImageControlTransformerBlock<B> {
    pub fn load(
        w: &Weights<B>,
        config: &ZImageTransformerConfig,
        first: bool,
    ) -> Result<Self, CheckpointError> {
        let dim = config.dim;
        Ok(Self {
            block: ZImageTransformerBlock::load(w, config, true)?,
            before_proj: if first {
                Some(Linear::load(&w.pp("before_proj"), dim, dim, true)?)
            } else {
                None
            },
            after_proj: Linear::load(&w.pp("after_proj"), dim, dim, true)?,
        })
    }

    /// One step of the control stream `c` beside the main stream `x` (which only the first
    /// block reads); pushes this block's hint.
    ///
    /// # Shapes
    /// `c`, `x`: `[batch, tokens, dim]` -> `[batch, tokens, dim]`
    pub fn forward(
        &self,
        c: Tensor<B, 3>,
        x: &Tensor<B, 3>,
        ctx: &SequenceContext<B>,
        adaln: &Tensor<B, 2>,
        hints: &mut Vec<Tensor<B, 3>>,
    ) -> Tensor<B, 3> {
        let c = match &self.before_proj {
            Some(proj) => proj.forward(c) + x.clone(),
            None => c,
        };
        let c = self.block.forward(c, ctx, Some(adaln));
        hints.push(self.after_proj.forward(c.clone()));
        c
    }
}

/// `control_noise_refiner`, by layout.
#[derive(Debug, Clone)]
pub enum ControlRefinerBlocks<B: ZBackend> {
    /// 1.0: plain blocks over the control stream, after the noise refiner.
    Plain(Vec<ZImageTransformerBlock<B>>),
    /// 2.1: control blocks beside the noise refiner.
    Control(Vec<ZImageControlTransformerBlock<B>>),
    /// 2.0: the control layers serve.
    ControlLayers,
}

/// The Z-Image ControlNet (`ZImageControlNetModel` in diffusers).
#[derive(Debug, Clone)]
pub struct ZImageControlNetModel<B: ZBackend> {
    /// `control_layers.{i}`, placed after main layer `control_layers_places[i]`.
    pub control_layers: Vec<ZImageControlTransformerBlock<B>>,
    /// `control_all_x_embedder.{p}-{pF}`, one per configured patch size.
    pub control_x_embedders: Vec<Linear<B>>,
    pub control_noise_refiner: ControlRefinerBlocks<B>,
    config: ZImageControlNetConfig,
    file: Option<PathBuf>,
}

impl<B: ZBackend> ZImageControlNetModel<B> {
    /// Builds the model through `w`; parameter paths are the checkpoint names.
    pub fn build(
        config: &ZImageControlNetConfig,
        base: &ZImageTransformerConfig,
        w: &Weights<B>,
    ) -> Result<Self, CheckpointError> {
        let blocks = config.block_config(base);
        let dim = config.dim;
        let control_layers = (0..config.control_layers_places.len())
            .map(|i| {
                ZImageControlTransformerBlock::load(&w.pp("control_layers").pp(i), &blocks, i == 0)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let control_x_embedders = config
            .all_patch_size
            .iter()
            .zip(&config.all_f_patch_size)
            .map(|(&p, &pf)| {
                Linear::load(
                    &w.pp("control_all_x_embedder").pp(format!("{p}-{pf}")),
                    pf * p * p * config.control_in_dim,
                    dim,
                    true,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let refiner = w.pp("control_noise_refiner");
        let control_noise_refiner = match config.add_control_noise_refiner {
            None => ControlRefinerBlocks::Plain(
                (0..config.n_refiner_layers)
                    .map(|i| ZImageTransformerBlock::load(&refiner.pp(i), &blocks, true))
                    .collect::<Result<_, _>>()?,
            ),
            Some(ControlNoiseRefiner::ControlNoiseRefiner) => ControlRefinerBlocks::Control(
                (0..config.n_refiner_layers)
                    .map(|i| ZImageControlTransformerBlock::load(&refiner.pp(i), &blocks, i == 0))
                    .collect::<Result<_, _>>()?,
            ),
            Some(ControlNoiseRefiner::ControlLayers) => ControlRefinerBlocks::ControlLayers,
        };
        Ok(Self {
            control_layers,
            control_x_embedders,
            control_noise_refiner,
            config: config.clone(),
            file: None,
        })
    }

    /// Loads a ControlNet checkpoint with its config, for the transformer of config `base`.
    pub fn load(
        config: &ZImageControlNetConfig,
        base: &ZImageTransformerConfig,
        checkpoint: Checkpoint,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, TransformerError> {
        let file = checkpoint.origin().to_path_buf();
        config.validate_for(base).map_err(|e| with_file(e, &file))?;
        let drop_refiner =
            config.add_control_noise_refiner == Some(ControlNoiseRefiner::ControlLayers);
        let map = WeightMap::new(checkpoint, |name, shape| {
            map_controlnet_key(base, drop_refiner, name, shape)
        });
        let mut model =
            zimage_nn::load_module(&map, device, precision, |w| Self::build(config, base, w))?;
        model.file = Some(file);
        Ok(model)
    }

    /// Loads a released single file (`Z-Image-Turbo-Fun-Controlnet-Union*.safetensors`), its
    /// config detected from the file ([`ZImageControlNetConfig::detect`]).
    pub fn from_file(
        path: impl AsRef<Path>,
        base: &ZImageTransformerConfig,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, TransformerError> {
        let checkpoint = Checkpoint::open(path.as_ref())?;
        let config = ZImageControlNetConfig::detect(&checkpoint, base)?;
        Self::load(&config, base, checkpoint, device, precision)
    }

    /// Random weights made on the device (benchmarks).
    pub fn random(
        config: &ZImageControlNetConfig,
        base: &ZImageTransformerConfig,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, TransformerError> {
        config.validate_for(base)?;
        Ok(Self::build(
            config,
            base,
            &Weights::random(device, precision),
        )?)
    }

    pub fn config(&self) -> &ZImageControlNetConfig {
        &self.config
    }

    /// The file it was loaded from.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The hints for one denoising evaluation, as `ZImageControlNetModel.forward` in diffusers:
    /// main layer index -> `[batch, tokens, dim]`, already times `scale`
    /// (`controlnet_conditioning_scale`), for
    /// [`ZImageTransformer2DModel::forward_with_residuals`] with the same inputs.
    ///
    /// - `latents`, `timesteps`, `captions`: what the transformer gets;
    /// - `control`: one `[control_in_dim, frames, height, width]` context per item, the size of
    ///   its latents.
    pub fn forward(
        &self,
        transformer: &ZImageTransformer2DModel<B>,
        latents: &[Tensor<B, 4>],
        timesteps: &[f32],
        captions: &[Tensor<B, 2>],
        control: &[Tensor<B, 4>],
        scale: f32,
    ) -> Result<LayerResiduals<B>, TransformerError> {
        let config = &self.config;
        let base = transformer.config();
        config.validate_for(base).map_err(|e| match &self.file {
            Some(f) => with_file(e, f),
            None => e,
        })?;
        if control.len() != latents.len() {
            return Err(TransformerError::Input(format!(
                "{} control contexts for {} latents",
                control.len(),
                latents.len()
            )));
        }
        for (i, (c, x)) in control.iter().zip(latents).enumerate() {
            let [cc, cf, ch, cw] = c.dims();
            let [_, f, h, w] = x.dims();
            if cc != config.control_in_dim || [cf, ch, cw] != [f, h, w] {
                return Err(TransformerError::Input(format!(
                    "control context {i} is [{cc}, {cf}, {ch}, {cw}]; the ControlNet takes [{}, {f}, {h}, {w}] (its control_in_dim and the latents' size)",
                    config.control_in_dim
                )));
            }
        }
        let prepared = transformer.prepare(latents, timesteps, captions)?;
        let adaln = &prepared.adaln;
        let (patch, f_patch) = (base.all_patch_size[0], base.all_f_patch_size[0]);
        // Control tokens: embedded like the image tokens, pad positions given `x_pad_token`.
        let mut context = transformer.embed_image_tokens(
            &self.control_x_embedders[0],
            control,
            &prepared.layouts,
            patch,
            f_patch,
        );

        // 2.x: control blocks beside the noise refiner, over the embedded image tokens.
        let beside_refiner = match &self.control_noise_refiner {
            ControlRefinerBlocks::Control(blocks) => Some(blocks),
            ControlRefinerBlocks::ControlLayers => Some(&self.control_layers),
            ControlRefinerBlocks::Plain(_) => None,
        };
        let mut refiner_hints = Vec::new();
        if let Some(blocks) = beside_refiner {
            for block in blocks {
                context = block.forward(
                    context,
                    &prepared.image,
                    &prepared.image_ctx,
                    adaln,
                    &mut refiner_hints,
                );
            }
        }
        let refiner_places = config
            .control_refiner_layers_places
            .as_deref()
            .filter(|_| beside_refiner.is_some())
            .unwrap_or(&[]);
        let mut x = prepared.image.clone();
        for (k, block) in transformer.noise_refiner.iter().enumerate() {
            x = block.forward(x, &prepared.image_ctx, Some(adaln));
            if let Some(idx) = refiner_places.iter().position(|&p| p == k) {
                x = x + refiner_hints[idx].clone().mul_scalar(scale);
            }
        }
        // 1.0: plain blocks over the control tokens, after the noise refiner.
        if let ControlRefinerBlocks::Plain(blocks) = &self.control_noise_refiner {
            for block in blocks {
                context = block.forward(context, &prepared.image_ctx, Some(adaln));
            }
        }

        // Both streams unified with the refined captions, through the control layers.
        let unified = prepared.unify(&x);
        let mut context = prepared.unify(&context);
        let mut hints = Vec::with_capacity(self.control_layers.len());
        for block in &self.control_layers {
            context = block.forward(context, &unified, &prepared.unified_ctx, adaln, &mut hints);
        }
        Ok(config
            .control_layers_places
            .iter()
            .zip(hints)
            .map(|(&place, hint)| (place, hint.mul_scalar(scale)))
            .collect())
    }
}
