//! `zimage generate`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::DType;
use clap::{Args, ValueEnum};
use zimage_lora::LoraAdapter;
use zimage_nn::{Precision, ZBackend};
use zimage_pipeline::memory::{self, gib};
use zimage_pipeline::record::{self, Provenance};
use zimage_pipeline::{InitImage, ModelFiles, Variant, ZImagePipeline};
use zimage_vae::TilingConfig;

use crate::backend::{self, BackendChoice, DtypeChoice};
use crate::output;
use crate::progress::Progress;
use crate::with_backend;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VariantChoice {
    Turbo,
    Base,
}

/// Where the model comes from: shared by `generate` and `serve`.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A model folder in the Hugging Face layout (model_index.json, transformer/, text_encoder/,
    /// tokenizer/, vae/, scheduler/), or a Hub repo id (`owner/name[@revision]`), downloaded into
    /// the Hugging Face cache on first use (HF_HOME, HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE apply)
    /// [default: Tongyi-MAI/Z-Image-Turbo, or none when --transformer, --text-encoder and --vae
    /// are all given]
    #[arg(long)]
    pub model: Option<String>,
    /// Transformer weights from one file (diffusers or original/ComfyUI names, e.g.
    /// z_image_turbo_bf16.safetensors, or a city96 / stable-diffusion.cpp GGUF, kept quantized);
    /// its config comes from --model, or is the published one.
    #[arg(long, value_name = "FILE")]
    pub transformer: Option<PathBuf>,
    /// Text-encoder weights from one file (e.g. ComfyUI's qwen_3_4b.safetensors, or a llama.cpp
    /// Qwen3 GGUF, kept quantized).
    #[arg(long, value_name = "FILE")]
    pub text_encoder: Option<PathBuf>,
    /// VAE weights from one file (diffusers names or BFL's ae.safetensors).
    #[arg(long, value_name = "FILE")]
    pub vae: Option<PathBuf>,
    /// Turbo or base: sets the default steps and guidance [default: detected from the model]
    #[arg(long, value_enum)]
    pub variant: Option<VariantChoice>,
}

impl ModelArgs {
    /// The model as the PNG parameters name it.
    pub fn label(&self) -> String {
        match &self.model {
            Some(model) => model.clone(),
            None if self.transformer.is_some()
                && self.text_encoder.is_some()
                && self.vae.is_some() =>
            {
                "single files".into()
            }
            None => zimage_hub::DEFAULT_MODEL.into(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// What to draw; give it several times for a batch of prompts.
    #[arg(long, short, required = true)]
    pub prompt: Vec<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to steer away from (used when guidance is on), for every prompt.
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Image width in pixels, a multiple of 16 [default: 1024, or the input image's]
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels, a multiple of 16 [default: 1024, or the input image's]
    #[arg(long)]
    pub height: Option<usize>,
    /// Denoising steps [default: 8 for Turbo, 50 for the base model]
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale; 0 turns guidance off [default: 0 for Turbo, 4 for the base model]
    #[arg(long, allow_negative_numbers = true)]
    pub guidance: Option<f32>,
    /// Caps the guided prediction's norm at this multiple of the positive one's; 0 is off.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub cfg_normalization: f32,
    /// Stops guidance once 1 - sigma exceeds this; 1 never stops it.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub cfg_truncation: f64,
    /// Seed of the torch-compatible CPU generator (same seed, same picture as diffusers)
    /// [default: random]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Images to make per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Longest prompt, in tokens (the chat template included).
    #[arg(long, default_value_t = 512)]
    pub max_sequence_length: usize,
    /// Custom sigmas before shifting, comma-separated (replaces the default schedule).
    #[arg(long, value_delimiter = ',')]
    pub sigmas: Option<Vec<f32>>,
    /// The flow-matching shift [default: the scheduler config's, 3 for Turbo]; few-step LoRAs
    /// and their derivatives name the one they were trained with.
    #[arg(long)]
    pub shift: Option<f64>,
    /// A LoRA / LoKr / LoHa adapter (diffusers/PEFT, kohya, ai-toolkit, ComfyUI, LyCORIS
    /// formats) with an optional scale, FILE[:SCALE] (1 by default); repeat for several.
    #[arg(long, value_name = "FILE[:SCALE]", value_parser = parse_lora)]
    pub lora: Vec<(PathBuf, f32)>,
    /// Start from this image (image-to-image, or inpainting with --mask).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// How much of the input image to repaint, in (0, 1] [default: 0.6, 1 with --mask]
    #[arg(long, allow_negative_numbers = true)]
    pub strength: Option<f64>,
    /// Inpainting mask: white is repainted, black kept. Needs --image.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// A Z-Image ControlNet (alibaba-pai's Fun-ControlNet-Union 1.0, 2.0 or 2.1 single file):
    /// the generation follows --control-image. With --image and --mask it is ControlNet
    /// inpainting (2.x files), which starts from noise (no --strength).
    #[arg(long, value_name = "FILE")]
    pub controlnet: Option<PathBuf>,
    /// The control image (canny edges, HED, depth, pose, MLSD), as the ControlNet expects it;
    /// --canny makes edges from a photograph first [default size of the output: this image's]
    #[arg(long, value_name = "FILE")]
    pub control_image: Option<PathBuf>,
    /// How strongly the control steers (diffusers' controlnet_conditioning_scale).
    #[arg(long, default_value_t = zimage_pipeline::ControlOptions::DEFAULT_SCALE, allow_negative_numbers = true)]
    pub control_scale: f32,
    /// Turn --control-image into canny edges first, with these hysteresis thresholds
    /// (LOW,HIGH on the 0-255 gradient; imageproc's Canny, close to but not OpenCV's).
    #[arg(long, value_name = "LOW,HIGH", num_args = 0..=1, default_missing_value = "100,200", value_parser = parse_thresholds)]
    pub canny: Option<(f32, f32)>,
    /// Decode (and encode) with the VAE in tiles of this many pixels: less memory for large images.
    #[arg(long)]
    pub vae_tile: Option<usize>,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// Compute dtype [default: bf16 on cuda, f32 elsewhere]
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeChoice>,
    /// What weight matrices are held in [default: as stored in the files, or bf16 when f32
    /// weights would not fit in memory]
    #[arg(long, value_enum)]
    pub weights_dtype: Option<DtypeChoice>,
    /// Run even when the memory estimate says the generation does not fit.
    #[arg(long)]
    pub force: bool,
    /// Where to write the image (.png with the parameters embedded, or .jpg); several images
    /// get -0, -1, ... before the extension, grouped by prompt.
    #[arg(long, short, default_value = "zimage.png")]
    pub output: PathBuf,
    /// Keep every model resident (otherwise each is freed when no longer needed).
    #[arg(long)]
    pub keep_models: bool,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // Everything that needs no model is checked before anything loads.
    if args.mask.is_some() && args.image.is_none() {
        bail!("--mask needs --image (the picture to inpaint)");
    }
    if args.strength.is_some() && args.image.is_none() {
        bail!("--strength applies only with --image");
    }
    if let Some(strength) = args.strength {
        if !(strength > 0.0 && strength <= 1.0) {
            bail!("--strength {strength} is outside (0, 1]");
        }
    }
    for (name, value) in [("--width", args.width), ("--height", args.height)] {
        if let Some(v) = value {
            if v == 0 || v % 16 != 0 {
                bail!("{name} {v} is not a positive multiple of 16");
            }
        }
    }
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    match (&args.controlnet, &args.control_image) {
        (Some(_), None) => {
            bail!("--controlnet needs --control-image (what the generation follows)")
        }
        (None, Some(_)) => bail!("--control-image needs --controlnet (the ControlNet weights)"),
        (Some(_), Some(_)) => {
            if args.image.is_some() && args.mask.is_none() {
                bail!("--controlnet with --image needs --mask (ControlNet inpainting); ControlNet image-to-image does not exist in diffusers");
            }
            if args.strength.is_some() {
                bail!("--strength does not apply to ControlNet generations (ControlNet inpainting starts from noise)");
            }
            if !args.control_scale.is_finite() {
                bail!(
                    "--control-scale {} is not a finite number",
                    args.control_scale
                );
            }
        }
        (None, None) => {
            if args.canny.is_some() {
                bail!("--canny applies to --control-image (with --controlnet)");
            }
        }
    }
    if args.steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    if let Some(shift) = args.shift {
        if !(shift > 0.0 && shift.is_finite()) {
            bail!("--shift {shift} is not a positive number");
        }
    }
    // Adapters are read (and their format checked) before any model loads.
    let adapters = args
        .lora
        .iter()
        .map(|(file, scale)| {
            LoraAdapter::open(file)
                .map(|a| (Arc::new(a), *scale))
                .with_context(|| format!("--lora {}", file.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    output::Format::of(&args.output)?;
    let backend = backend::resolve(args.backend)?;
    let dtype = args
        .dtype
        .map(DtypeChoice::dtype)
        .unwrap_or(backend.default_dtype());
    backend.check_dtype(dtype)?;
    if let Some(weights) = args.weights_dtype {
        backend.check_weights_dtype(weights.dtype())?;
    }
    let files = open_model(&args.model, args.quiet)?;
    with_backend!(backend, |B| generate::<B>(
        &args,
        files,
        adapters.clone(),
        dtype,
        backend.name()
    ))
}

/// The model's parts: a local folder or the Hub snapshot (only the weights no single file
/// replaces are downloaded) with single files on top, or the single files alone.
pub fn open_model(args: &ModelArgs, quiet: bool) -> Result<ModelFiles> {
    use zimage_hub::{Component, HubOptions};
    let singles = [&args.transformer, &args.text_encoder, &args.vae];
    let mut files = match &args.model {
        None if singles.iter().all(|f| f.is_some()) => ModelFiles::single_files(),
        model => {
            let spec = model.as_deref().unwrap_or(zimage_hub::DEFAULT_MODEL);
            let mut options = HubOptions::from_env();
            if quiet {
                options = options.quiet();
            }
            let needed: Vec<Component> = [
                (Component::Transformer, &args.transformer),
                (Component::TextEncoder, &args.text_encoder),
                (Component::Vae, &args.vae),
            ]
            .into_iter()
            .filter(|(_, file)| file.is_none())
            .map(|(component, _)| component)
            .collect();
            match zimage_hub::resolve_model_with(spec, &options, &needed)? {
                zimage_hub::Resolved::Folder(root) => ModelFiles::open(&root)?,
                zimage_hub::Resolved::SingleFiles(found) => {
                    let mut files = ModelFiles::single_files();
                    for (component, path) in found {
                        files = match component {
                            Component::Transformer => files.with_transformer_file(path)?,
                            Component::TextEncoder => files.with_text_encoder_file(path)?,
                            Component::Vae => files.with_vae_file(path)?,
                        };
                    }
                    files
                }
            }
        }
    };
    if let Some(file) = &args.transformer {
        files = files.with_transformer_file(file)?;
    }
    if let Some(file) = &args.text_encoder {
        files = files.with_text_encoder_file(file)?;
    }
    if let Some(file) = &args.vae {
        files = files.with_vae_file(file)?;
    }
    if let Some(variant) = args.variant {
        files = files.with_variant(match variant {
            VariantChoice::Turbo => Variant::Turbo,
            VariantChoice::Base => Variant::Base,
        });
    }
    Ok(files)
}

fn load_image(path: &PathBuf) -> Result<image::DynamicImage> {
    image::open(path).with_context(|| format!("cannot read image {}", path.display()))
}

fn parse_thresholds(spec: &str) -> std::result::Result<(f32, f32), String> {
    let parsed = spec
        .split_once(',')
        .and_then(|(l, h)| Some((l.trim().parse::<f32>().ok()?, h.trim().parse::<f32>().ok()?)));
    match parsed {
        Some((low, high)) if low >= 0.0 && low <= high => Ok((low, high)),
        _ => Err(format!(
            "{spec:?} is not LOW,HIGH with 0 <= LOW <= HIGH (e.g. 100,200)"
        )),
    }
}

fn parse_lora(spec: &str) -> std::result::Result<(PathBuf, f32), String> {
    zimage_lora::parse_spec(spec)
}

fn generate<B: ZBackend>(
    args: &GenerateArgs,
    files: ModelFiles,
    adapters: Vec<(Arc<LoraAdapter>, f32)>,
    dtype: DType,
    backend: &str,
) -> Result<()> {
    let device = B::Device::default();
    let start = Instant::now();
    if !args.quiet {
        let choice = files.variant_choice();
        eprintln!("Z-Image {} ({})", choice.variant.name(), choice.reason);
    }
    let precision = Precision::from(dtype).with_weights(args.weights_dtype.map(DtypeChoice::dtype));
    let mut pipeline =
        ZImagePipeline::<B>::new(files, &device, precision)?.keep_models(args.keep_models);
    if !adapters.is_empty() {
        let reports = pipeline.set_adapters(adapters)?;
        if !args.quiet {
            for report in reports {
                eprintln!(
                    "LoRA {} at {}: {} modules",
                    report.file.display(),
                    report.scale,
                    report.applied
                );
                for ignored in &report.ignored {
                    eprintln!("  not applied: {ignored}");
                }
            }
        }
    }
    if let Some(file) = &args.controlnet {
        // The error names the file.
        let config = pipeline.set_controlnet(Some(file))?.cloned();
        if let (Some(config), false) = (config, args.quiet) {
            eprintln!(
                "ControlNet {} ({} control layers)",
                config.release(),
                config.control_layers_places.len()
            );
        }
    }
    let mut options = pipeline.options(args.prompt[0].clone());
    options.prompts = args.prompt.clone();
    let multiple = pipeline.size_multiple();
    if let Some(negative) = &args.negative_prompt {
        options.negative_prompts = Some(vec![negative.clone(); args.prompt.len()]);
    }
    let control = match &args.control_image {
        Some(path) => {
            let mut image = load_image(path)?.to_rgb8();
            if let Some((low, high)) = args.canny {
                image = zimage_pipeline::canny(&image, low, high)?;
            }
            Some(zimage_pipeline::ControlOptions {
                image,
                scale: args.control_scale,
                inpaint: None,
            })
        }
        None => None,
    };
    if let Some(mut control) = control {
        // The output takes the control image's size, rounded down to the size multiple.
        let (w, h) = (
            control.image.width() as usize,
            control.image.height() as usize,
        );
        options.width = args.width.unwrap_or(w / multiple * multiple);
        options.height = args.height.unwrap_or(h / multiple * multiple);
        if let (Some(image), Some(mask)) = (&args.image, &args.mask) {
            control.inpaint = Some(zimage_pipeline::ControlInpaint {
                image: load_image(image)?.to_rgb8(),
                mask: zimage_pipeline::resize::to_gray(&load_image(mask)?),
            });
        }
        options.control = Some(control);
    } else if let Some(path) = &args.image {
        let image = load_image(path)?.to_rgb8();
        // diffusers' default: the input's own size, rounded down to the size multiple.
        let (w, h) = (image.width() as usize, image.height() as usize);
        options.width = args.width.unwrap_or(w / multiple * multiple);
        options.height = args.height.unwrap_or(h / multiple * multiple);
        let mask = args
            .mask
            .as_ref()
            .map(|m| load_image(m).map(|i| zimage_pipeline::resize::to_gray(&i)))
            .transpose()?;
        let strength = args
            .strength
            .unwrap_or(InitImage::default_strength(mask.is_some()));
        options.init_image = Some(InitImage {
            image,
            strength,
            mask,
        });
    } else {
        options.width = args.width.unwrap_or(options.width);
        options.height = args.height.unwrap_or(options.height);
    }
    if let Some(steps) = args.steps {
        options.num_inference_steps = steps;
    }
    if let Some(guidance) = args.guidance {
        options.guidance_scale = guidance;
    }
    options.cfg_normalization = args.cfg_normalization;
    options.cfg_truncation = args.cfg_truncation;
    options.num_images_per_prompt = args.num_images;
    options.max_sequence_length = args.max_sequence_length;
    options.sigmas = args.sigmas.clone();
    options.shift = args.shift;
    options.seed = args.seed.unwrap_or_else(random_seed);
    if let Some(tile) = args.vae_tile {
        options.vae_tiling = Some(TilingConfig::for_sample_size(tile, pipeline.vae_config()));
    }
    let paths = output::paths(
        &args.output,
        options.prompts.len() * options.num_images_per_prompt,
    );
    if !args.quiet {
        eprintln!(
            "{}x{}, {} steps, guidance {}, seed {}, {backend} {}",
            options.width,
            options.height,
            options.num_inference_steps,
            options.guidance_scale,
            options.seed,
            backend::dtype_name(dtype)
        );
    }

    if B::host_kernels(&device) {
        pipeline = fit_host_memory(pipeline, &options, args)?;
    }

    let mut progress = Progress::new(args.quiet);
    let generation = pipeline.generate(&options, &mut |event| progress.handle(event))?;
    if !args.quiet {
        progress.done();
    }
    drop(progress);

    let provenance = Provenance {
        model: args.model.label(),
        variant: pipeline.variant(),
        backend: backend.into(),
        dtype: backend::dtype_name(dtype).into(),
        loras: args
            .lora
            .iter()
            .map(|(f, s)| {
                (
                    f.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    *s,
                )
            })
            .collect(),
        controlnet: args
            .controlnet
            .as_ref()
            .and_then(|f| f.file_name())
            .map(|n| n.to_string_lossy().into_owned()),
    };
    let parameters = record::parameters(&options, &provenance);
    for (image, path) in generation.images.iter().zip(&paths) {
        output::save(image, path, &parameters.to_string())?;
        println!("{}", path.display());
    }
    if !args.quiet {
        eprintln!("done in {:.1} s", start.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Checks the run against the host's available memory before anything loads. Without an
/// explicit `--weights-dtype`, weights stored in f32 are held in bf16 when f32 would not fit
/// (as diffusers users load the f32 Turbo transformer with `torch_dtype=torch.bfloat16`).
fn fit_host_memory<B: ZBackend>(
    pipeline: ZImagePipeline<B>,
    options: &zimage_pipeline::GenerateOptions,
    args: &GenerateArgs,
) -> Result<ZImagePipeline<B>> {
    let Some(available) = memory::available_host_memory()? else {
        return Ok(pipeline);
    };
    let estimate = pipeline.estimate_memory(options)?;
    if estimate.peak() <= available {
        return Ok(pipeline);
    }
    let mut pipeline = pipeline;
    if args.weights_dtype.is_none() {
        let stored = pipeline.precision();
        pipeline = pipeline.with_precision(stored.with_weights(Some(DType::BF16)));
        let narrowed = pipeline.estimate_memory(options)?;
        if narrowed.peak() < estimate.peak() && narrowed.peak() <= available {
            if !args.quiet {
                eprintln!(
                    "holding the weights in bf16: as stored the run needs {estimate}, and {} is available (--weights-dtype f32 to insist)",
                    gib(available)
                );
            }
            return Ok(pipeline);
        }
        pipeline = pipeline.with_precision(stored);
    }
    match memory::check_fits(&estimate, available, "host") {
        Err(e) if !args.force => Err(e.into()),
        Err(e) => {
            if !args.quiet {
                eprintln!("warning (--force): {e}");
            }
            Ok(pipeline)
        }
        Ok(()) => Ok(pipeline),
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // Seeds users can type back: below 2^32 (torch keeps only the low 32 bits anyway).
    h.finish() & 0xffff_ffff
}
