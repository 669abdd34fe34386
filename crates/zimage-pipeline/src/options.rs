//! What a generation asks for, with diffusers' semantics for every knob.

use image::{GrayImage, RgbImage};
use zimage_vae::TilingConfig;

use crate::folder::Variant;

/// A starting image: image-to-image, or inpainting with a mask.
#[derive(Debug, Clone)]
pub struct InitImage {
    pub image: RgbImage,
    /// How much of the schedule is re-run, in (0, 1]: 1 ignores the image's content.
    pub strength: f64,
    /// White (>= 0.5) marks what is repainted; black is kept. Resized to the output size.
    pub mask: Option<GrayImage>,
}

impl InitImage {
    /// diffusers' default strength: 0.6 for image-to-image, 1.0 for inpainting.
    pub fn default_strength(inpaint: bool) -> f64 {
        if inpaint {
            1.0
        } else {
            0.6
        }
    }
}

/// The control of a ControlNet generation (diffusers' `ZImageControlNetPipeline` and
/// `ZImageControlNetInpaintPipeline`); the ControlNet itself is set on the pipeline
/// ([`crate::ZImagePipeline::set_controlnet`]).
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// The control image (canny edges, pose, depth, HED...: see [`crate::canny`] for edges),
    /// resized to the output size (Lanczos) when its size differs. Its VAE latents (the
    /// posterior's mode) are what the ControlNet sees.
    pub image: RgbImage,
    /// `controlnet_conditioning_scale`: the hints are multiplied by it.
    pub scale: f32,
    /// ControlNet inpainting (2.x ControlNets only): the image to repaint and its mask.
    pub inpaint: Option<ControlInpaint>,
}

impl ControlOptions {
    /// diffusers' default `controlnet_conditioning_scale`.
    pub const DEFAULT_SCALE: f32 = 0.75;

    /// Text-to-image under `image`, at the default scale.
    pub fn new(image: RgbImage) -> Self {
        Self {
            image,
            scale: Self::DEFAULT_SCALE,
            inpaint: None,
        }
    }
}

/// `image` and `mask_image` of `ZImageControlNetInpaintPipeline`: the 2.x ControlNet gets the
/// masked image's latents and the mask beside the control image's latents. The denoising itself
/// starts from noise (no strength, no latent blending: unlike [`InitImage`]).
#[derive(Debug, Clone)]
pub struct ControlInpaint {
    pub image: RgbImage,
    /// White (>= 0.5) marks what is repainted; black is kept. Resized to the output size.
    pub mask: GrayImage,
}

/// One call of the pipeline. [`GenerateOptions::new`] fills the defaults of a variant.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// One entry per prompt of the batch.
    pub prompts: Vec<String>,
    /// One per prompt, used when guidance is on; empty strings when `None`.
    pub negative_prompts: Option<Vec<String>>,
    pub width: usize,
    pub height: usize,
    pub num_inference_steps: usize,
    /// `pred = pos + g (pos - neg)`; guidance is on when `g > 0`.
    pub guidance_scale: f32,
    /// Caps `||pred||` at this multiple of `||pos||` (per image); 0 turns it off.
    pub cfg_normalization: f32,
    /// Guidance stops once `1 - sigma` exceeds this; 1 (or more) never stops it.
    pub cfg_truncation: f64,
    pub max_sequence_length: usize,
    /// Custom sigmas (before shifting) instead of Z-Image's `linspace(1, 1/N, N)`.
    pub sigmas: Option<Vec<f32>>,
    /// The flow-matching shift in place of the scheduler config's (3 for Turbo), as few-step
    /// LoRAs and their derivatives ask for; it turns dynamic shifting off.
    pub shift: Option<f64>,
    pub num_images_per_prompt: usize,
    /// Seed of the torch-compatible CPU generator.
    pub seed: u64,
    pub init_image: Option<InitImage>,
    /// ControlNet control (needs a ControlNet set on the pipeline; not with `init_image`).
    pub control: Option<ControlOptions>,
    /// Decode (and encode) in tiles of this configuration.
    pub vae_tiling: Option<TilingConfig>,
    /// Stop with an error when the latents stop being finite (one host read per step).
    pub check_finite: bool,
}

impl GenerateOptions {
    /// One prompt at 1024x1024 with the variant's steps and guidance.
    pub fn new(prompt: impl Into<String>, variant: Variant) -> Self {
        Self {
            prompts: vec![prompt.into()],
            negative_prompts: None,
            width: 1024,
            height: 1024,
            num_inference_steps: variant.default_steps(),
            guidance_scale: variant.default_guidance(),
            cfg_normalization: 0.0,
            cfg_truncation: 1.0,
            max_sequence_length: 512,
            sigmas: None,
            shift: None,
            num_images_per_prompt: 1,
            seed: 0,
            init_image: None,
            control: None,
            vae_tiling: None,
            check_finite: true,
        }
    }

    /// Classifier-free guidance is on (diffusers >= 0.37: `guidance_scale > 0`).
    pub fn guidance_enabled(&self) -> bool {
        self.guidance_scale > 0.0
    }
}

/// Where a generation is, for progress bars, previews and cancelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    LoadingTextEncoder,
    EncodingPrompts,
    LoadingTransformer,
    Denoising,
    LoadingVae,
    EncodingImage,
    Decoding,
}

impl Stage {
    pub fn describe(self) -> &'static str {
        match self {
            Stage::LoadingTextEncoder => "loading the text encoder",
            Stage::EncodingPrompts => "encoding prompts",
            Stage::LoadingTransformer => "loading the transformer",
            Stage::Denoising => "denoising",
            Stage::LoadingVae => "loading the VAE",
            Stage::EncodingImage => "encoding the input image",
            Stage::Decoding => "decoding",
        }
    }
}
