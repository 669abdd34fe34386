use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zimage_nn::ZBackend;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Tensor, TensorData};
use image::{GrayImage, RgbImage};
use zimage_scheduler::{
    calculate_shift, z_image_sigmas, FlowMatchEulerDiscreteScheduler,
    FlowMatchEulerDiscreteSchedulerConfig,
};
use zimage_text::{PromptTokenizer, Qwen3TextEncoder};
use zimage_transformer::{ZImageControlNetConfig, ZImageControlNetModel, ZImageTransformer2DModel};
use zimage_vae::AutoencoderKL;

use zimage_lora::{AdapterReport, LoraAdapter, Resolved};
use zimage_nn::{Checkpoint, Precision};

use crate::memory::{MemoryEstimate, StageMemory};
use crate::options::{GenerateOptions, Stage};
use crate::{ConfigSource, ModelFiles, NoiseDtype, PipelineError, TorchGenerator, Variant};

/// What the pipeline reports while it works. Returning `ControlFlow::Break` from the callback
/// cancels the generation.
#[derive(Debug)]
pub enum Event<'a, B: Backend> {
    /// A stage begins.
    Stage(Stage),
    /// A component finished loading: how long it took, and the bytes its weights occupy.
    Loaded {
        stage: Stage,
        elapsed: Duration,
        bytes: usize,
    },
    /// A denoising step finished; `latents` are the f32 latents after it.
    Step {
        step: usize,
        total: usize,
        latents: &'a Tensor<B, 4>,
    },
}

/// Images and the latents they were decoded from.
#[derive(Debug)]
pub struct Generation<B: ZBackend> {
    /// `prompts x num_images_per_prompt` images, grouped by prompt.
    pub images: Vec<RgbImage>,
    /// Final latents, `[images, 16, height / 8, width / 8]`, f32 (before VAE scaling is undone).
    pub latents: Tensor<B, 4>,
}

/// Z-Image text-to-image, image-to-image and inpainting (`ZImagePipeline`,
/// `ZImageImg2ImgPipeline`, `ZImageInpaintPipeline` in diffusers).
///
/// Components are loaded when first needed and, unless `keep_models` is set, freed as soon as
/// the generation no longer needs them: the text encoder after the prompts are encoded, the
/// transformer after denoising. Only one large component is resident at a time that way.
pub struct ZImagePipeline<B: ZBackend> {
    files: ModelFiles,
    device: B::Device,
    precision: Precision,
    keep_models: bool,
    tokenizer: PromptTokenizer,
    scheduler_config: FlowMatchEulerDiscreteSchedulerConfig,
    vae_config: zimage_vae::AutoencoderKLConfig,
    transformer_config: zimage_transformer::ZImageTransformerConfig,
    text_encoder_config: zimage_text::Qwen3Config,
    /// Where the transformer's, text encoder's and VAE's configs came from.
    sources: [ConfigSource; 3],
    text_encoder: Option<Qwen3TextEncoder<B>>,
    transformer: Option<ZImageTransformer2DModel<B>>,
    vae: Option<AutoencoderKL<B>>,
    /// Adapters matched to the transformer, applied whenever it is loaded.
    adapters: Resolved,
    /// The ControlNet file and its config; the model loads and is freed with the transformer.
    controlnet_file: Option<(std::path::PathBuf, ZImageControlNetConfig)>,
    controlnet: Option<ZImageControlNetModel<B>>,
}

impl<B: ZBackend> ZImagePipeline<B> {
    /// A model's parts ([`ModelFiles`]: a folder, single files, or both); configs and the tokenizer
    /// are read now, weights load on first use, in `precision` ([`Precision`]: the compute dtype,
    /// and what weight matrices are held in).
    pub fn new(
        files: ModelFiles,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, PipelineError> {
        files.check_complete()?;
        let (transformer_config, transformer_source) = files.transformer_config()?;
        let (text_encoder_config, text_encoder_source) = files.text_encoder_config()?;
        let (vae_config, vae_source) = files.vae_config()?;
        Ok(Self {
            tokenizer: files.tokenizer()?,
            scheduler_config: files.scheduler_config()?,
            vae_config,
            transformer_config,
            text_encoder_config,
            sources: [transformer_source, text_encoder_source, vae_source],
            files,
            device: device.clone(),
            precision: precision.into(),
            keep_models: false,
            text_encoder: None,
            transformer: None,
            vae: None,
            adapters: Resolved::none(),
            controlnet_file: None,
            controlnet: None,
        })
    }

    /// Sets the adapters (LoRA, LoKr, LoHa; each with its scale) the transformer runs with, in
    /// place of the previous set; an empty list removes them, restoring the weights exactly.
    /// They are matched to the transformer now (every module that names no layer, or has the
    /// wrong shape, is an error before anything changes) and applied to the resident
    /// transformer at once, or when it is next loaded; nothing is reloaded.
    pub fn set_adapters(
        &mut self,
        adapters: Vec<(Arc<LoraAdapter>, f32)>,
    ) -> Result<&[AdapterReport], PipelineError> {
        let targets =
            ZImageTransformer2DModel::<B>::adapter_targets(&self.transformer_config, &self.device)?;
        self.adapters = zimage_lora::resolve(&adapters, &targets)?;
        if let Some(transformer) = &mut self.transformer {
            transformer.set_adapters(&self.adapters);
        }
        Ok(self.adapters.reports())
    }

    /// Sets the ControlNet (a `Z-Image-Turbo-Fun-Controlnet-Union*.safetensors` file, 1.0 or
    /// 2.x) that generations with [`GenerateOptions::control`] run with, or removes it (`None`).
    /// Its config is detected from the file ([`ZImageControlNetConfig::detect`]) and checked
    /// against the transformer now; the weights load with the transformer, and are freed with
    /// it unless models are kept. Returns the detected config.
    pub fn set_controlnet(
        &mut self,
        file: Option<&std::path::Path>,
    ) -> Result<Option<&ZImageControlNetConfig>, PipelineError> {
        match file {
            None => {
                self.controlnet_file = None;
                self.controlnet = None;
                Ok(None)
            }
            Some(file) => {
                let checkpoint = Checkpoint::open(file)?;
                let config = ZImageControlNetConfig::detect(&checkpoint, &self.transformer_config)?;
                self.set_controlnet_with_config(file, config)
            }
        }
    }

    /// [`Self::set_controlnet`] with the ControlNet's `config.json`
    /// ([`ZImageControlNetConfig::from_file`]) instead of the detected one.
    pub fn set_controlnet_with_config(
        &mut self,
        file: &std::path::Path,
        config: ZImageControlNetConfig,
    ) -> Result<Option<&ZImageControlNetConfig>, PipelineError> {
        config
            .validate_for(&self.transformer_config)
            .map_err(|e| match e {
                zimage_transformer::TransformerError::ControlNet { reason, .. } => {
                    zimage_transformer::TransformerError::ControlNet {
                        file: Some(file.to_path_buf()),
                        reason,
                    }
                }
                other => other,
            })?;
        self.controlnet = None;
        self.controlnet_file = Some((file.to_path_buf(), config));
        Ok(self.controlnet_file.as_ref().map(|(_, c)| c))
    }

    /// The config of the ControlNet set with [`Self::set_controlnet`].
    pub fn controlnet_config(&self) -> Option<&ZImageControlNetConfig> {
        self.controlnet_file.as_ref().map(|(_, c)| c)
    }

    /// The adapters set with [`Self::set_adapters`].
    pub fn adapters(&self) -> &Resolved {
        &self.adapters
    }

    /// Loads weights in `precision` from now on (components already loaded are dropped).
    pub fn with_precision(mut self, precision: impl Into<Precision>) -> Self {
        self.precision = precision.into();
        self.text_encoder = None;
        self.transformer = None;
        self.vae = None;
        self.controlnet = None;
        self
    }

    /// Keeps every component resident after use (servers, repeated generations).
    pub fn keep_models(mut self, keep: bool) -> Self {
        self.keep_models = keep;
        self
    }

    pub fn variant(&self) -> Variant {
        self.files.variant()
    }

    pub fn files(&self) -> &ModelFiles {
        &self.files
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.precision.compute
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn transformer_config(&self) -> &zimage_transformer::ZImageTransformerConfig {
        &self.transformer_config
    }

    pub fn text_encoder_config(&self) -> &zimage_text::Qwen3Config {
        &self.text_encoder_config
    }

    /// Width and height must be multiples of this: the VAE's downscale factor times the DiT's
    /// 2x2 patch (16 for the published model).
    pub fn size_multiple(&self) -> usize {
        self.vae_config.downscale_factor() * 2
    }

    pub fn vae_config(&self) -> &zimage_vae::AutoencoderKLConfig {
        &self.vae_config
    }

    /// Options with this model's defaults.
    pub fn options(&self, prompt: impl Into<String>) -> GenerateOptions {
        GenerateOptions::new(prompt, self.variant())
    }

    /// What `options` will need in memory at the largest stage, from the checkpoints' headers
    /// (nothing is loaded) and the size and batch asked for.
    pub fn estimate_memory(
        &self,
        options: &GenerateOptions,
    ) -> Result<MemoryEstimate, PipelineError> {
        // Options the pipeline would refuse (a size beyond the model) are reported as such, not
        // as an absurd memory figure.
        self.plan(options)?;
        let host = B::host_kernels(&self.device);
        let held = |weights: &std::path::Path| -> Result<u64, PipelineError> {
            let checkpoint = Checkpoint::open(weights)?;
            Ok(crate::memory::held_bytes(
                &checkpoint,
                self.precision,
                host,
                |d| B::supports_dtype(&self.device, d),
            ))
        };
        // The ControlNet loads and is freed with the transformer; a control image keeps the VAE
        // (which encodes it) loaded through the denoising.
        let mut dit_weights = held(&self.files.transformer()?.weights)?;
        if let Some((file, _)) = &self.controlnet_file {
            dit_weights += held(file)?;
            if options.control.is_some() && !self.keep_models {
                dit_weights += held(&self.files.vae()?.weights)?;
            }
        }
        let [text, dit, vae] = crate::memory::activations(
            options,
            &self.text_encoder_config,
            &self.transformer_config,
            &self.vae_config,
            self.precision.compute,
        );
        Ok(MemoryEstimate {
            stages: vec![
                StageMemory {
                    stage: "text encoder",
                    weights: held(&self.files.text_encoder()?.weights)?,
                    activations: text,
                },
                StageMemory {
                    stage: "transformer",
                    weights: dit_weights,
                    activations: dit,
                },
                StageMemory {
                    stage: "VAE",
                    weights: held(&self.files.vae()?.weights)?,
                    activations: vae,
                },
            ],
            keep_models: self.keep_models,
        })
    }

    /// Loads every component now (they stay resident if `keep_models` is set).
    pub fn load_all(
        &mut self,
        events: &mut dyn FnMut(Event<'_, B>) -> ControlFlow<()>,
    ) -> Result<(), PipelineError> {
        self.ensure_text_encoder(events)?;
        self.ensure_transformer(events)?;
        self.ensure_vae(events)
    }

    fn ensure_text_encoder(
        &mut self,
        events: &mut dyn FnMut(Event<'_, B>) -> ControlFlow<()>,
    ) -> Result<(), PipelineError> {
        if self.text_encoder.is_none() {
            let start = Instant::now();
            let _ = events(Event::Stage(Stage::LoadingTextEncoder));
            let file = self.files.text_encoder()?.weights.clone();
            let checkpoint = Checkpoint::open(&file)?;
            let bytes = checkpoint.weight_bytes();
            let loaded = Qwen3TextEncoder::load(
                &self.text_encoder_config,
                checkpoint,
                &self.device,
                self.precision,
            );
            self.text_encoder = Some(published(
                loaded,
                &self.sources[1],
                "Qwen3-4B text encoder",
                &file,
            )?);
            let _ = events(Event::Loaded {
                stage: Stage::LoadingTextEncoder,
                elapsed: start.elapsed(),
                bytes,
            });
        }
        Ok(())
    }

    fn ensure_transformer(
        &mut self,
        events: &mut dyn FnMut(Event<'_, B>) -> ControlFlow<()>,
    ) -> Result<(), PipelineError> {
        if self.transformer.is_none() {
            let start = Instant::now();
            let _ = events(Event::Stage(Stage::LoadingTransformer));
            let file = self.files.transformer()?.weights.clone();
            let checkpoint = Checkpoint::open(&file)?;
            let bytes = checkpoint.weight_bytes();
            let loaded = ZImageTransformer2DModel::load(
                &self.transformer_config,
                checkpoint,
                &self.device,
                self.precision,
            );
            let mut transformer =
                published(loaded, &self.sources[0], "Z-Image transformer", &file)?;
            if !self.adapters.is_empty() {
                transformer.set_adapters(&self.adapters);
            }
            self.transformer = Some(transformer);
            let _ = events(Event::Loaded {
                stage: Stage::LoadingTransformer,
                elapsed: start.elapsed(),
                bytes,
            });
        }
        if let (Some((file, config)), true) = (&self.controlnet_file, self.controlnet.is_none()) {
            let start = Instant::now();
            let checkpoint = Checkpoint::open(file)?;
            let bytes = checkpoint.weight_bytes();
            let controlnet = ZImageControlNetModel::load(
                config,
                &self.transformer_config,
                checkpoint,
                &self.device,
                self.precision,
            )?;
            self.controlnet = Some(controlnet);
            let _ = events(Event::Loaded {
                stage: Stage::LoadingTransformer,
                elapsed: start.elapsed(),
                bytes,
            });
        }
        Ok(())
    }

    fn ensure_vae(
        &mut self,
        events: &mut dyn FnMut(Event<'_, B>) -> ControlFlow<()>,
    ) -> Result<(), PipelineError> {
        if self.vae.is_none() {
            let start = Instant::now();
            let _ = events(Event::Stage(Stage::LoadingVae));
            let file = self.files.vae()?.weights.clone();
            let checkpoint = Checkpoint::open(&file)?;
            let bytes = checkpoint.weight_bytes();
            let loaded =
                AutoencoderKL::load(&self.vae_config, checkpoint, &self.device, self.precision);
            self.vae = Some(published(loaded, &self.sources[2], "Flux VAE", &file)?);
            let _ = events(Event::Loaded {
                stage: Stage::LoadingVae,
                elapsed: start.elapsed(),
                bytes,
            });
        }
        Ok(())
    }

    /// Runs one generation.
    pub fn generate(
        &mut self,
        options: &GenerateOptions,
        events: &mut dyn FnMut(Event<'_, B>) -> ControlFlow<()>,
    ) -> Result<Generation<B>, PipelineError> {
        let latents = self.denoise(options, events)?;
        self.ensure_vae(events)?;
        let vae = self.vae.as_ref().expect("loaded above");
        let _ = events(Event::Stage(Stage::Decoding));
        let z = vae.unscale_latents(latents.clone().cast(vae.dtype()));
        // Untiled unless asked, or unless the device cannot hold the whole decode.
        let decoded = vae.decode_fitted(z, options.vae_tiling)?;
        let images = zimage_vae::tensor_to_images(decoded)?;
        if !self.keep_models {
            self.vae = None;
        }
        Ok(Generation { images, latents })
    }

    /// Everything up to the final latents (diffusers' `output_type="latent"`).
    pub fn denoise(
        &mut self,
        options: &GenerateOptions,
        events: &mut dyn FnMut(Event<'_, B>) -> ControlFlow<()>,
    ) -> Result<Tensor<B, 4>, PipelineError> {
        let plan = self.plan(options)?;
        let guidance = options.guidance_enabled();

        // Prompts: features per prompt, then per image.
        self.ensure_text_encoder(events)?;
        let encoder = self.text_encoder.as_ref().expect("loaded above");
        let _ = events(Event::Stage(Stage::EncodingPrompts));
        let positive = encoder.encode_prompts(
            &self.tokenizer,
            &options.prompts,
            options.max_sequence_length,
        )?;
        let negative = if guidance {
            let negatives = options
                .negative_prompts
                .clone()
                .unwrap_or_else(|| vec![String::new(); options.prompts.len()]);
            encoder.encode_prompts(&self.tokenizer, &negatives, options.max_sequence_length)?
        } else {
            Vec::new()
        };
        if !self.keep_models {
            self.text_encoder = None;
        }
        let per_image = |features: Vec<Tensor<B, 2>>| -> Vec<Tensor<B, 2>> {
            features
                .into_iter()
                .flat_map(|f| std::iter::repeat(f).take(options.num_images_per_prompt))
                .collect()
        };
        let positive = per_image(positive);
        let negative = per_image(negative);
        let prompt_dtype = positive
            .first()
            .map(Tensor::dtype)
            .unwrap_or(self.precision.compute);

        // Schedule: Z-Image's sigmas (or the caller's), shifted; img2img starts part-way.
        let mut scheduler_config = self.scheduler_config.clone();
        if let Some(shift) = options.shift {
            scheduler_config.shift = shift;
            scheduler_config.use_dynamic_shifting = false;
        }
        let mu = calculate_shift(
            plan.latent_height / 2 * (plan.latent_width / 2),
            &scheduler_config,
        );
        let mut scheduler = FlowMatchEulerDiscreteScheduler::new(scheduler_config)?;
        let sigmas = options
            .sigmas
            .clone()
            .unwrap_or_else(|| z_image_sigmas(options.num_inference_steps));
        scheduler.set_timesteps(None, Some(&sigmas), Some(mu))?;
        let steps = sigmas.len();
        let t_start = match &options.init_image {
            Some(init) => {
                let kept = (steps as f64 * init.strength).min(steps as f64);
                (steps as f64 - kept).max(0.0) as usize
            }
            None => 0,
        };
        if t_start >= steps {
            return Err(PipelineError::Invalid(format!(
                "strength {} leaves no denoising step out of {steps}",
                options
                    .init_image
                    .as_ref()
                    .map(|i| i.strength)
                    .unwrap_or(1.0)
            )));
        }
        scheduler.set_begin_index(t_start);
        let timesteps: Vec<f32> = scheduler.timesteps()[t_start..].to_vec();

        // ControlNet: the control context from the VAE (the posterior's mode: no draw from the
        // generator), `[1, control_in_dim, latent_height, latent_width]`.
        let control_context = match &options.control {
            Some(control) => {
                self.ensure_vae(events)?;
                let vae = self.vae.as_ref().expect("loaded above");
                let _ = events(Event::Stage(Stage::EncodingImage));
                let in_dim = self.controlnet_config().map_or(0, |c| c.control_in_dim);
                Some(crate::control::control_context(
                    vae,
                    control,
                    options,
                    in_dim,
                    &self.device,
                )?)
            }
            None => None,
        };

        let mut generator = TorchGenerator::manual_seed(options.seed);
        let batch = plan.batch;
        let shape = [batch, plan.channels, plan.latent_height, plan.latent_width];
        let mut inpaint: Option<(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> = None;
        let mut latents = match &options.init_image {
            None => noise::<B>(&self.device, &mut generator, shape, DType::F32),
            Some(init) => {
                // The posterior sample draws from the generator before the noise does.
                let image = prepare_image(&init.image, options.width, options.height);
                self.ensure_vae(events)?;
                let vae = self.vae.as_ref().expect("loaded above");
                let _ = events(Event::Stage(Stage::EncodingImage));
                let pixels = zimage_vae::image_to_tensor::<B>(&image, &self.device, DType::F32)
                    .cast(prompt_dtype);
                let posterior = vae.encode_fitted(pixels, options.vae_tiling)?;
                let mean_shape: [usize; 4] = posterior.mode().dims();
                let vae_dtype = vae.dtype();
                let sample_noise = noise::<B>(&self.device, &mut generator, mean_shape, vae_dtype);
                let image_latents = vae.scale_latents(posterior.sample(sample_noise)?);
                let image_latents = image_latents.repeat_dim(0, batch);
                let noise = noise::<B>(&self.device, &mut generator, shape, prompt_dtype);
                let latents =
                    scheduler.scale_noise(image_latents.clone().cast(prompt_dtype), noise.clone());
                if let Some(mask) = &init.mask {
                    let mask = prepare_mask::<B>(
                        mask,
                        options.width,
                        options.height,
                        plan.latent_height,
                        plan.latent_width,
                        &self.device,
                    )
                    .repeat_dim(0, batch);
                    inpaint = Some((mask, image_latents, noise));
                }
                latents
            }
        };
        if !self.keep_models {
            self.vae = None;
        }

        self.ensure_transformer(events)?;
        let transformer = self.transformer.as_ref().expect("loaded above");
        let model_dtype = transformer.dtype();
        let _ = events(Event::Stage(Stage::Denoising));
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let t_model = (1000.0 - t) / 1000.0;
            let scale = if guidance
                && options.cfg_truncation <= 1.0
                && t_model as f64 > options.cfg_truncation
            {
                0.0
            } else {
                options.guidance_scale
            };
            let apply_cfg = guidance && scale > 0.0;
            let inputs: Vec<Tensor<B, 4>> = (0..batch)
                .map(|j| {
                    latents.clone().narrow(0, j, 1).cast(model_dtype).reshape([
                        plan.channels,
                        1,
                        plan.latent_height,
                        plan.latent_width,
                    ])
                })
                .collect();
            let (inputs, captions) = if apply_cfg {
                let doubled: Vec<_> = inputs.iter().chain(&inputs).cloned().collect();
                (
                    doubled,
                    positive
                        .iter()
                        .chain(&negative)
                        .cloned()
                        .collect::<Vec<_>>(),
                )
            } else {
                (inputs, positive.clone())
            };
            let timestep_input = vec![t_model; inputs.len()];
            let out = match (&control_context, &options.control, &self.controlnet) {
                (Some(context), Some(control), Some(controlnet)) => {
                    // The same control context for every item, doubled with the batch for CFG.
                    let [_, c, h, w] = context.dims();
                    let item = context.clone().cast(model_dtype).reshape([c, 1, h, w]);
                    let contexts = vec![item; inputs.len()];
                    let residuals = controlnet.forward(
                        transformer,
                        &inputs,
                        &timestep_input,
                        &captions,
                        &contexts,
                        control.scale,
                    )?;
                    transformer.forward_with_residuals(
                        &inputs,
                        &timestep_input,
                        &captions,
                        &residuals,
                    )?
                }
                _ => transformer.forward(&inputs, &timestep_input, &captions)?,
            };
            let preds: Vec<Tensor<B, 4>> = (0..batch)
                .map(|j| {
                    let pos = out[j].clone().cast(DType::F32);
                    if !apply_cfg {
                        return pos;
                    }
                    let neg = out[batch + j].clone().cast(DType::F32);
                    let pred = pos.clone() + (pos.clone() - neg).mul_scalar(scale);
                    if options.cfg_normalization > 0.0 {
                        renormalize(pred, &pos, options.cfg_normalization)
                    } else {
                        pred
                    }
                })
                .collect();
            // The model predicts x0 - noise; the scheduler integrates noise - x0.
            let velocity = Tensor::cat(preds, 0)
                .reshape([batch, plan.channels, plan.latent_height, plan.latent_width])
                .neg();
            latents = scheduler.step(velocity, latents)?;
            if let Some((mask, image_latents, noise)) = &inpaint {
                // Keep the unmasked region: the original latents re-noised to the next sigma.
                let proper = if i + 1 < total {
                    scheduler.scale_noise(image_latents.clone().cast(prompt_dtype), noise.clone())
                } else {
                    image_latents.clone()
                };
                let mask = mask.clone().cast(DType::F32);
                latents =
                    (mask.ones_like() - mask.clone()) * proper.cast(DType::F32) + mask * latents;
            }
            if options.check_finite {
                let finite = latents
                    .clone()
                    .is_finite()
                    .all()
                    .int()
                    .into_scalar()
                    .elem::<i64>()
                    == 1;
                if !finite {
                    return Err(PipelineError::NonFinite { step: i + 1, total });
                }
            }
            if events(Event::Step {
                step: i + 1,
                total,
                latents: &latents,
            })
            .is_break()
            {
                return Err(PipelineError::Cancelled { step: i + 1 });
            }
        }
        if !self.keep_models {
            self.transformer = None;
            self.controlnet = None;
        }
        Ok(latents)
    }

    /// Checks a request against the model and works out the latent geometry.
    fn plan(&self, options: &GenerateOptions) -> Result<Plan, PipelineError> {
        let invalid = |reason: String| Err(PipelineError::Invalid(reason));
        if options.prompts.is_empty() {
            return invalid("no prompt given".into());
        }
        if let Some(negatives) = &options.negative_prompts {
            if negatives.len() != options.prompts.len() {
                return invalid(format!(
                    "{} negative prompts for {} prompts",
                    negatives.len(),
                    options.prompts.len()
                ));
            }
        }
        let multiple = self.size_multiple();
        if options.width == 0
            || options.height == 0
            || options.width % multiple != 0
            || options.height % multiple != 0
        {
            return invalid(format!(
                "width and height must be positive multiples of {multiple} (got {}x{})",
                options.width, options.height
            ));
        }
        // The DiT's position table bounds the image (8192 pixels a side for the published
        // model): refuse here, before anything is allocated for an impossible size.
        let config = &self.transformer_config;
        let patch = config.all_patch_size.first().copied().unwrap_or(2);
        let per_pixel = self.vae_config.downscale_factor() * patch;
        for (side, value, axis) in [("height", options.height, 1), ("width", options.width, 2)] {
            let positions = config.axes_lens.get(axis).copied().unwrap_or(0);
            if value / per_pixel > positions {
                return invalid(format!(
                    "{side} {value} is more than the model's {} pixels a side (its position table has {positions} positions)",
                    positions * per_pixel
                ));
            }
        }
        if options.sigmas.is_none() && options.num_inference_steps == 0 {
            return invalid("at least one inference step is needed".into());
        }
        if options.num_images_per_prompt == 0 {
            return invalid("num_images_per_prompt must be at least 1".into());
        }
        if !(options.guidance_scale >= 0.0) || !options.guidance_scale.is_finite() {
            return invalid(format!(
                "guidance scale {} must be finite and >= 0",
                options.guidance_scale
            ));
        }
        if !(options.cfg_normalization >= 0.0) {
            return invalid(format!(
                "cfg normalization {} must be >= 0 (0 is off)",
                options.cfg_normalization
            ));
        }
        if options.max_sequence_length == 0 {
            return invalid("max_sequence_length must be at least 1".into());
        }
        if let Some(init) = &options.init_image {
            if !(init.strength > 0.0 && init.strength <= 1.0) {
                return invalid(format!("strength {} is outside (0, 1]", init.strength));
            }
        }
        if let Some(control) = &options.control {
            let Some(config) = self.controlnet_config() else {
                return invalid("control options are given, but no ControlNet is set".into());
            };
            if options.init_image.is_some() {
                return invalid(
                    "ControlNet generation starts from noise: give the image to repaint as the \
                     control's inpaint image (2.x ControlNets), not as an init image"
                        .into(),
                );
            }
            if !control.scale.is_finite() {
                return invalid(format!("control scale {} is not finite", control.scale));
            }
            crate::control::check(control, config, self.transformer_config.in_channels)?;
        }
        Ok(Plan {
            batch: options.prompts.len() * options.num_images_per_prompt,
            channels: self.transformer_config.in_channels,
            latent_height: 2 * (options.height / multiple),
            latent_width: 2 * (options.width / multiple),
        })
    }
}

/// A component loaded with its built-in (published) config, or the error saying the file is not
/// that component.
fn published<M, E: Into<PipelineError>>(
    loaded: Result<M, E>,
    source: &ConfigSource,
    component: &'static str,
    file: &std::path::Path,
) -> Result<M, PipelineError> {
    loaded.map_err(|e| match (source, e.into()) {
        (ConfigSource::Published, error) => PipelineError::NotPublished {
            component,
            file: file.to_path_buf(),
            source: Box::new(error),
        },
        (_, error) => error,
    })
}

struct Plan {
    batch: usize,
    channels: usize,
    latent_height: usize,
    latent_width: usize,
}

/// Standard normal noise from the torch-compatible generator, drawn as a `dtype` tensor draws it.
fn noise<B: ZBackend>(
    device: &B::Device,
    generator: &mut TorchGenerator,
    shape: [usize; 4],
    dtype: DType,
) -> Tensor<B, 4> {
    let draw = match dtype {
        DType::BF16 => NoiseDtype::BF16,
        DType::F64 => NoiseDtype::F64,
        _ => NoiseDtype::F32,
    };
    let values = generator.randn(shape.iter().product(), draw);
    Tensor::<B, 4>::from_data(TensorData::new(values, shape), (device, DType::F32)).cast(dtype)
}

/// Scales `pred` down so that its norm is at most `factor * ||pos||` (norms over the whole image).
fn renormalize<B: ZBackend>(pred: Tensor<B, 4>, pos: &Tensor<B, 4>, factor: f32) -> Tensor<B, 4> {
    let norm = |t: &Tensor<B, 4>| t.clone().square().sum().sqrt().into_scalar().elem::<f32>();
    let max_norm = norm(pos) * factor;
    let new_norm = norm(&pred);
    if new_norm > max_norm {
        pred.mul_scalar(max_norm / new_norm)
    } else {
        pred
    }
}

/// The input image at the output size (Lanczos when it must be resized; diffusers' default size
/// is the image's own, rounded down to the VAE multiple, which the caller passes).
fn prepare_image(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    if image.width() as usize == width && image.height() as usize == height {
        image.clone()
    } else {
        crate::resize::resize_lanczos(image, width as u32, height as u32)
    }
}

/// The mask as diffusers' mask processor leaves it: grayscale, resized to the output size,
/// binarised at 0.5, then resized to the latent grid by nearest neighbour.
///
/// # Shapes
/// -> `[1, 1, latent_height, latent_width]`, f32
fn prepare_mask<B: ZBackend>(
    mask: &GrayImage,
    width: usize,
    height: usize,
    latent_height: usize,
    latent_width: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let mask = if mask.width() as usize == width && mask.height() as usize == height {
        mask.clone()
    } else {
        crate::resize::resize_lanczos(mask, width as u32, height as u32)
    };
    // `F.interpolate(mode="nearest")`: source index floor(dst * in / out).
    let scale_y = height as f32 / latent_height as f32;
    let scale_x = width as f32 / latent_width as f32;
    let mut values = Vec::with_capacity(latent_height * latent_width);
    for y in 0..latent_height {
        let sy = ((y as f32 * scale_y) as usize).min(height - 1);
        for x in 0..latent_width {
            let sx = ((x as f32 * scale_x) as usize).min(width - 1);
            let v = mask.get_pixel(sx as u32, sy as u32).0[0] as f32 / 255.0;
            values.push(if v < 0.5 { 0.0 } else { 1.0 });
        }
    }
    Tensor::from_data(
        TensorData::new(values, [1, 1, latent_height, latent_width]),
        (device, DType::F32),
    )
}
