use std::collections::BTreeMap;
use std::path::Path;
use zimage_nn::ZBackend;

use burn::tensor::{Bool, DType, Tensor, TensorData};
use zimage_nn::{AttentionImpl, CheckpointError, Linear, Precision, WeightMap, Weights};

use crate::block::{FinalLayer, SequenceContext, ZImageTransformerBlock};
use crate::checkpoint;
use crate::config::SEQ_MULTI_OF;
use crate::embedders::{CaptionEmbedder, TimestepEmbedder};
use crate::rope::{RopeEmbedder, RopeTable};
use crate::{TransformerError, ZImageTransformerConfig};

/// Residuals added to the unified sequence right after chosen main layers (layer index ->
/// `[batch, tokens, dim]`), the way ControlNet hints enter the model.
pub type LayerResiduals<B> = BTreeMap<usize, Tensor<B, 3>>;

/// The Z-Image S3-DiT (`ZImageTransformer2DModel` in diffusers).
#[derive(Debug, Clone)]
pub struct ZImageTransformer2DModel<B: ZBackend> {
    /// `all_x_embedder.{p}-{pF}`, one per configured patch size.
    pub x_embedders: Vec<Linear<B>>,
    /// `all_final_layer.{p}-{pF}`.
    pub final_layers: Vec<FinalLayer<B>>,
    pub t_embedder: TimestepEmbedder<B>,
    pub cap_embedder: CaptionEmbedder<B>,
    /// `x_pad_token`, `[1, dim]`: fills image token runs up to a multiple of 32.
    pub x_pad_token: Tensor<B, 2>,
    /// `cap_pad_token`, `[1, dim]`: fills caption runs up to a multiple of 32.
    pub cap_pad_token: Tensor<B, 2>,
    pub noise_refiner: Vec<ZImageTransformerBlock<B>>,
    pub context_refiner: Vec<ZImageTransformerBlock<B>>,
    pub layers: Vec<ZImageTransformerBlock<B>>,
    config: ZImageTransformerConfig,
    rope: RopeEmbedder,
    attention: AttentionImpl,
}

/// One item's token layout: image run, caption run, and their padded lengths.
pub(crate) struct ItemLayout {
    /// Latent frames, height, width.
    pub(crate) size: [usize; 3],
    /// Tokens per axis after patching.
    grid: [usize; 3],
    pub(crate) image_tokens: usize,
    pub(crate) image_padded: usize,
    caption_tokens: usize,
    caption_padded: usize,
}

/// What [`ZImageTransformer2DModel::prepare`] computes for one pass.
pub(crate) struct Prepared<B: ZBackend> {
    pub(crate) layouts: Vec<ItemLayout>,
    /// `[batch, adaln_dim]`, the timestep conditioning.
    pub(crate) adaln: Tensor<B, 2>,
    /// `[batch, longest image run, dim]`: embedded image tokens, before the noise refiner.
    pub(crate) image: Tensor<B, 3>,
    pub(crate) image_ctx: SequenceContext<B>,
    /// `[batch, longest caption run, dim]`: caption tokens after the context refiner.
    pub(crate) caption: Tensor<B, 3>,
    pub(crate) unified_ctx: SequenceContext<B>,
    unified_lens: Vec<usize>,
    pub(crate) dtype: DType,
    dim: usize,
}

impl<B: ZBackend> Prepared<B> {
    /// Each item's image run (of `image`, `[batch, longest image run, dim]`) followed by its
    /// caption run, batch-padded with zeros: `[batch, longest unified run, dim]`.
    pub(crate) fn unify(&self, image: &Tensor<B, 3>) -> Tensor<B, 3> {
        let dim = self.dim;
        let device = image.device();
        let runs: Vec<Tensor<B, 2>> = self
            .layouts
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let xi = image
                    .clone()
                    .narrow(0, i, 1)
                    .reshape([image.dims()[1], dim])
                    .narrow(0, 0, l.image_padded);
                let ci = self
                    .caption
                    .clone()
                    .narrow(0, i, 1)
                    .reshape([self.caption.dims()[1], dim])
                    .narrow(0, 0, l.caption_padded);
                Tensor::cat(vec![xi, ci], 0)
            })
            .collect();
        pad_batch(runs, &self.unified_lens, dim, self.dtype, &device)
    }
}

impl<B: ZBackend> ZImageTransformer2DModel<B> {
    /// Builds the model through `w`; parameter paths are the diffusers checkpoint names.
    pub fn build(
        config: &ZImageTransformerConfig,
        w: &Weights<B>,
    ) -> Result<Self, CheckpointError> {
        let dim = config.dim;
        let patches = 0..config.all_patch_size.len();
        let blocks = |name: &str, count: usize, modulated: bool| {
            (0..count)
                .map(|i| ZImageTransformerBlock::load(&w.pp(name).pp(i), config, modulated))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            x_embedders: patches
                .clone()
                .map(|i| {
                    Linear::load(
                        &w.pp("all_x_embedder").pp(config.patch_key(i)),
                        config.patch_dim(i),
                        dim,
                        true,
                    )
                })
                .collect::<Result<_, _>>()?,
            final_layers: patches
                .map(|i| {
                    FinalLayer::load(
                        &w.pp("all_final_layer").pp(config.patch_key(i)),
                        dim,
                        config.adaln_dim(),
                        config.patch_dim(i),
                    )
                })
                .collect::<Result<_, _>>()?,
            t_embedder: TimestepEmbedder::load(&w.pp("t_embedder"), config.adaln_dim())?,
            cap_embedder: CaptionEmbedder::load(
                &w.pp("cap_embedder"),
                config.cap_feat_dim,
                dim,
                config.norm_eps,
            )?,
            x_pad_token: w.tensor("x_pad_token", [1, dim])?,
            cap_pad_token: w.tensor("cap_pad_token", [1, dim])?,
            noise_refiner: blocks("noise_refiner", config.n_refiner_layers, true)?,
            context_refiner: blocks("context_refiner", config.n_refiner_layers, false)?,
            layers: blocks("layers", config.n_layers, true)?,
            config: config.clone(),
            rope: RopeEmbedder::new(config.rope_theta, &config.axes_dims, &config.axes_lens),
            attention: AttentionImpl::default(),
        })
    }

    /// Loads from a checkpoint in diffusers or original/ComfyUI naming (see [`checkpoint`]).
    /// Weight matrices are held as `precision` says ([`Precision`]), the rest in its compute dtype.
    pub fn load(
        config: &ZImageTransformerConfig,
        checkpoint: zimage_nn::Checkpoint,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, TransformerError> {
        config.validate()?;
        let map = WeightMap::new(checkpoint, |name, shape| {
            checkpoint::map_key(config, name, shape)
        });
        Ok(zimage_nn::load_module(&map, device, precision, |w| {
            Self::build(config, w)
        })?)
    }

    /// Loads a diffusers `transformer/` folder: `config.json` and one safetensors file or shards
    /// with their index.
    pub fn from_folder(
        folder: impl AsRef<Path>,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, TransformerError> {
        let folder = folder.as_ref();
        let config = ZImageTransformerConfig::from_file(folder.join("config.json"))?;
        Self::load(
            &config,
            zimage_nn::Checkpoint::open(folder)?,
            device,
            precision,
        )
    }

    /// Random weights made on the device (benchmarks).
    pub fn random(
        config: &ZImageTransformerConfig,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, TransformerError> {
        config.validate()?;
        Ok(Self::build(config, &Weights::random(device, precision))?)
    }

    pub fn config(&self) -> &ZImageTransformerConfig {
        &self.config
    }

    /// Chooses how attention is computed (the backend's op by default).
    pub fn with_attention(mut self, attention: AttentionImpl) -> Self {
        self.attention = attention;
        self
    }

    /// The dtype of the weights (inputs are cast to it).
    pub fn dtype(&self) -> DType {
        self.x_pad_token.dtype()
    }

    /// One denoising evaluation, as `ZImageTransformer2DModel.forward` in diffusers.
    ///
    /// - `latents`: one `[channels, frames, height, width]` tensor per item (sizes may differ).
    /// - `timesteps`: one value per item, `1 - sigma` (0 is pure noise).
    /// - `captions`: one `[tokens, cap_feat_dim]` tensor per item (lengths may differ).
    ///
    /// Returns one `[channels, frames, height, width]` tensor per item, in the weights' dtype.
    /// The output is `x0 - noise`: pipelines negate it before the Euler step.
    pub fn forward(
        &self,
        latents: &[Tensor<B, 4>],
        timesteps: &[f32],
        captions: &[Tensor<B, 2>],
    ) -> Result<Vec<Tensor<B, 4>>, TransformerError> {
        self.forward_with_residuals(latents, timesteps, captions, &LayerResiduals::new())
    }

    /// [`Self::forward`] with `residuals[k]` added to the sequence after main layer `k`.
    pub fn forward_with_residuals(
        &self,
        latents: &[Tensor<B, 4>],
        timesteps: &[f32],
        captions: &[Tensor<B, 2>],
        residuals: &LayerResiduals<B>,
    ) -> Result<Vec<Tensor<B, 4>>, TransformerError> {
        let config = &self.config;
        if let Some((&k, _)) = residuals.range(config.n_layers..).next() {
            return Err(TransformerError::Input(format!(
                "a residual is given for layer {k}, but the model has {} layers",
                config.n_layers
            )));
        }
        let prepared = self.prepare(latents, timesteps, captions)?;
        let mut x = prepared.image.clone();
        for block in &self.noise_refiner {
            x = block.forward(x, &prepared.image_ctx, Some(&prepared.adaln));
        }
        let mut unified = prepared.unify(&x);
        for (k, block) in self.layers.iter().enumerate() {
            unified = block.forward(unified, &prepared.unified_ctx, Some(&prepared.adaln));
            if let Some(residual) = residuals.get(&k) {
                unified = unified + residual.clone().cast(prepared.dtype);
            }
        }
        let out = self.final_layers[0].forward(unified, &prepared.adaln);

        let (patch, f_patch) = (config.all_patch_size[0], config.all_f_patch_size[0]);
        let tokens = out.dims()[1];
        let patch_dim = config.patch_dim(0);
        Ok(prepared
            .layouts
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let rows = out
                    .clone()
                    .narrow(0, i, 1)
                    .reshape([tokens, patch_dim])
                    .narrow(0, 0, l.image_tokens);
                unpatchify(rows, l.size, config.in_channels, patch, f_patch)
            })
            .collect())
    }

    /// Everything before the noise refiner, shared with the ControlNet (which runs the same
    /// embedders and refiners, as diffusers' `ZImageControlNetModel.from_transformer` shares
    /// them): the timestep conditioning, the embedded (not yet refined) image tokens, the
    /// refined caption tokens, and the sequence contexts.
    pub(crate) fn prepare(
        &self,
        latents: &[Tensor<B, 4>],
        timesteps: &[f32],
        captions: &[Tensor<B, 2>],
    ) -> Result<Prepared<B>, TransformerError> {
        let config = &self.config;
        let layouts = self.layouts(latents, timesteps, captions)?;
        let device = latents[0].device();
        let dtype = self.dtype();
        let dim = config.dim;
        let batch = latents.len();
        // The first configured patch size (the only one published checkpoints have).
        let (patch, f_patch) = (config.all_patch_size[0], config.all_f_patch_size[0]);

        let scaled: Vec<f32> = timesteps
            .iter()
            .map(|&t| t * config.t_scale as f32)
            .collect();
        let adaln = self.t_embedder.forward(&scaled, &device, dtype);

        // Image tokens: patchify, embed, fill to a multiple of 32 with the pad token.
        let image =
            self.embed_image_tokens(&self.x_embedders[0], latents, &layouts, patch, f_patch);
        let image_rope = |l: &ItemLayout, table: &mut RopeTable| -> Result<(), TransformerError> {
            let [ft, ht, wt] = l.grid;
            let start = l.caption_padded + 1;
            let ids = (0..ft).flat_map(move |f| {
                (0..ht).flat_map(move |h| (0..wt).map(move |w| [start + f, h, w]))
            });
            self.rope.extend(table, ids)?;
            self.rope.extend(
                table,
                std::iter::repeat([0, 0, 0]).take(l.image_padded - l.image_tokens),
            )
        };
        let caption_rope = |l: &ItemLayout, table: &mut RopeTable| {
            self.rope
                .extend(table, (0..l.caption_padded).map(|j| [1 + j, 0, 0]))
        };

        let image_lens: Vec<usize> = layouts.iter().map(|l| l.image_padded).collect();
        let image_ctx = self.context(&layouts, &image_lens, |l, t| image_rope(l, t), &device)?;

        // Caption tokens: embed, fill with the pad token, refine without modulation.
        let caps: Vec<Tensor<B, 2>> = captions.iter().map(|c| c.clone().cast(dtype)).collect();
        let embedded = self.cap_embedder.forward(Tensor::cat(caps, 0));
        let caption_runs: Vec<_> = split_rows(embedded, layouts.iter().map(|l| l.caption_tokens))
            .into_iter()
            .zip(&layouts)
            .map(|(run, l)| {
                fill(
                    run,
                    &self.cap_pad_token,
                    l.caption_padded - l.caption_tokens,
                )
            })
            .collect();
        let caption_lens: Vec<usize> = layouts.iter().map(|l| l.caption_padded).collect();
        let cap_ctx = self.context(&layouts, &caption_lens, |l, t| caption_rope(l, t), &device)?;
        let mut caption = pad_batch(caption_runs, &caption_lens, dim, dtype, &device);
        for block in &self.context_refiner {
            caption = block.forward(caption, &cap_ctx, None);
        }

        // Unified sequence, image first then caption, through the main layers.
        let unified_lens: Vec<usize> = layouts
            .iter()
            .map(|l| l.image_padded + l.caption_padded)
            .collect();
        // The largest activation of the pass: refuse it rather than compute on a truncated buffer.
        let longest = unified_lens.iter().copied().max().unwrap_or(0);
        zimage_nn::device::check_fits::<B>(
            &device,
            || "the main layers' feed-forward activation".into(),
            &[batch, longest, self.config.ffn_hidden_dim()],
            dtype,
        )?;
        let unified_ctx = self.context(
            &layouts,
            &unified_lens,
            |l, t| {
                image_rope(l, t)?;
                caption_rope(l, t)
            },
            &device,
        )?;
        Ok(Prepared {
            layouts,
            adaln,
            image,
            image_ctx,
            caption,
            unified_ctx,
            unified_lens,
            dtype,
            dim,
        })
    }

    /// `[C, F, H, W]` inputs (latents, or the ControlNet's control context) patchified, embedded
    /// by `embedder`, each run filled to its padded length with `x_pad_token` and batch-padded
    /// with zeros: `[batch, longest, dim]`.
    pub(crate) fn embed_image_tokens(
        &self,
        embedder: &Linear<B>,
        inputs: &[Tensor<B, 4>],
        layouts: &[ItemLayout],
        patch: usize,
        f_patch: usize,
    ) -> Tensor<B, 3> {
        let dtype = self.dtype();
        let device = inputs[0].device();
        let patches: Vec<Tensor<B, 2>> = inputs
            .iter()
            .map(|x| patchify(x.clone().cast(dtype), patch, f_patch))
            .collect();
        let embedded = embedder.forward(Tensor::cat(patches, 0));
        let runs: Vec<_> = split_rows(embedded, layouts.iter().map(|l| l.image_tokens))
            .into_iter()
            .zip(layouts)
            .map(|(run, l)| fill(run, &self.x_pad_token, l.image_padded - l.image_tokens))
            .collect();
        let lens: Vec<usize> = layouts.iter().map(|l| l.image_padded).collect();
        pad_batch(runs, &lens, self.config.dim, dtype, &device)
    }

    /// Validates the inputs and computes each item's token layout.
    pub(crate) fn layouts(
        &self,
        latents: &[Tensor<B, 4>],
        timesteps: &[f32],
        captions: &[Tensor<B, 2>],
    ) -> Result<Vec<ItemLayout>, TransformerError> {
        let config = &self.config;
        let batch = latents.len();
        if batch == 0 || timesteps.len() != batch || captions.len() != batch {
            return Err(TransformerError::Input(format!(
                "got {} latents, {} timesteps and {} captions; expected the same non-zero count",
                batch,
                timesteps.len(),
                captions.len()
            )));
        }
        let (patch, f_patch) = (config.all_patch_size[0], config.all_f_patch_size[0]);
        latents
            .iter()
            .zip(captions)
            .enumerate()
            .map(|(i, (x, cap))| {
                let [c, f, h, w] = x.dims();
                if c != config.in_channels {
                    return Err(TransformerError::Input(format!(
                        "latent {i} has {c} channels, the model takes {}",
                        config.in_channels
                    )));
                }
                if f == 0 || h == 0 || w == 0 || f % f_patch != 0 || h % patch != 0 || w % patch != 0 {
                    return Err(TransformerError::Input(format!(
                        "latent {i} is {f}x{h}x{w} (frames x height x width); each must be a positive multiple of the patch size ({f_patch}, {patch}, {patch})"
                    )));
                }
                let [tokens, width] = cap.dims();
                if width != config.cap_feat_dim || tokens == 0 {
                    return Err(TransformerError::Input(format!(
                        "caption {i} is [{tokens}, {width}]; expected at least one token of width {}",
                        config.cap_feat_dim
                    )));
                }
                let grid = [f / f_patch, h / patch, w / patch];
                let image_tokens = grid.iter().product();
                Ok(ItemLayout {
                    size: [f, h, w],
                    grid,
                    image_tokens,
                    image_padded: image_tokens.next_multiple_of(SEQ_MULTI_OF),
                    caption_tokens: tokens,
                    caption_padded: tokens.next_multiple_of(SEQ_MULTI_OF),
                })
            })
            .collect()
    }

    /// RoPE rows and key mask for sequences of lengths `lens` (batch-padded to the longest).
    fn context(
        &self,
        layouts: &[ItemLayout],
        lens: &[usize],
        mut rows: impl FnMut(&ItemLayout, &mut RopeTable) -> Result<(), TransformerError>,
        device: &B::Device,
    ) -> Result<SequenceContext<B>, TransformerError> {
        let longest = lens.iter().copied().max().unwrap_or(0);
        let mut table = RopeTable::default();
        for (layout, &len) in layouts.iter().zip(lens) {
            rows(layout, &mut table)?;
            self.rope.extend_zeros(&mut table, longest - len);
        }
        let batch = lens.len();
        let key_valid = (lens.iter().any(|&len| len != longest)).then(|| {
            let valid: Vec<bool> = lens
                .iter()
                .flat_map(|&len| (0..longest).map(move |j| j < len))
                .collect();
            Tensor::<B, 2, Bool>::from_data(TensorData::new(valid, [batch, longest]), device)
        });
        Ok(SequenceContext {
            rope: table.into_rotary(batch, longest, self.rope.pairs(), device),
            key_valid,
            attention: self.attention,
        })
    }
}

/// `[C, F, H, W]` -> `[tokens, pF * p * p * C]`: tokens row-major over (f, h, w), each vector
/// ordered (pF, pH, pW, C) with the channel fastest. (At most six dimensions: burn-ndarray's
/// limit.)
fn patchify<B: ZBackend>(x: Tensor<B, 4>, patch: usize, f_patch: usize) -> Tensor<B, 2> {
    let [c, f, h, w] = x.dims();
    let (ft, ht, wt) = (f / f_patch, h / patch, w / patch);
    x.reshape([c, f * h * w])
        .transpose()
        .reshape([ft, f_patch, ht, patch, wt, patch * c])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([ft * ht * wt, f_patch * patch * patch * c])
}

/// Inverse of [`patchify`].
fn unpatchify<B: ZBackend>(
    x: Tensor<B, 2>,
    [f, h, w]: [usize; 3],
    c: usize,
    patch: usize,
    f_patch: usize,
) -> Tensor<B, 4> {
    let (ft, ht, wt) = (f / f_patch, h / patch, w / patch);
    x.reshape([ft, ht, wt, f_patch, patch, patch * c])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([f * h * w, c])
        .transpose()
        .reshape([c, f, h, w])
}

fn split_rows<B: ZBackend>(
    x: Tensor<B, 2>,
    lens: impl Iterator<Item = usize>,
) -> Vec<Tensor<B, 2>> {
    let mut start = 0;
    lens.map(|len| {
        let part = x.clone().narrow(0, start, len);
        start += len;
        part
    })
    .collect()
}

/// Appends `count` copies of the `[1, dim]` pad token.
fn fill<B: ZBackend>(run: Tensor<B, 2>, pad: &Tensor<B, 2>, count: usize) -> Tensor<B, 2> {
    if count == 0 {
        return run;
    }
    let dim = pad.dims()[1];
    Tensor::cat(vec![run, pad.clone().expand([count, dim])], 0)
}

/// Stacks runs into `[batch, longest, dim]`, zero-filling the shorter ones (as `pad_sequence`).
fn pad_batch<B: ZBackend>(
    runs: Vec<Tensor<B, 2>>,
    lens: &[usize],
    dim: usize,
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, 3> {
    let longest = lens.iter().copied().max().unwrap_or(0);
    let runs = runs
        .into_iter()
        .zip(lens)
        .map(|(run, &len)| {
            if len == longest {
                run
            } else {
                Tensor::cat(
                    vec![run, Tensor::zeros([longest - len, dim], (device, dtype))],
                    0,
                )
            }
        })
        .collect();
    Tensor::stack(runs, 0)
}
