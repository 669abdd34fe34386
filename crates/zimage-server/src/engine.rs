//! What runs jobs: the [`Engine`] trait, [`PipelineEngine`] (a resident [`ZImagePipeline`] on
//! any backend), and the worker thread that owns it.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use axum::http::StatusCode;
use burn::tensor::{DType, Tensor};
use zimage_lora::LoraAdapter;
use zimage_nn::ZBackend;
use zimage_pipeline::memory::{self, gib};
use zimage_pipeline::record::{self, Provenance};
use zimage_pipeline::{
    ControlInpaint, ControlOptions, Event, GenerateOptions, InitImage, PipelineError, Variant,
    ZImagePipeline,
};

use crate::error::ServerError;
use crate::jobs::{Job, JobFailure, JobImage, JobSpec, Outcome, Queue};
use crate::preview;

/// What the server tells clients about its model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub variant: Variant,
    /// Width and height must be multiples of this.
    pub size_multiple: usize,
    pub backend: String,
    pub dtype: String,
    /// Every model stays loaded between jobs (else each is loaded per job).
    pub resident: bool,
    /// A ControlNet is set: requests may give a control image.
    pub controlnet: bool,
}

/// Why a job did not produce images.
#[derive(Debug)]
pub enum RunError {
    Cancelled,
    Failed(JobFailure),
}

/// Runs jobs on one device, one at a time.
pub trait Engine: 'static {
    fn info(&self) -> ModelInfo;
    /// Runs `job`, reporting its stages and steps on it ([`Job::set_stage`],
    /// [`Job::set_step`]) and stopping between steps once [`Job::cancel_requested`].
    fn run(&mut self, job: &Job) -> Result<Vec<JobImage>, RunError>;
}

/// A [`ZImagePipeline`] serving jobs: adapters switched per job (read from the adapter folder
/// once, then kept), previews from the latents after each step, PNGs with the same parameters
/// `zimage generate` writes.
pub struct PipelineEngine<B: ZBackend> {
    pipeline: ZImagePipeline<B>,
    provenance: Provenance,
    lora_dir: Option<PathBuf>,
    loaded_adapters: HashMap<String, Arc<LoraAdapter>>,
    current_adapters: Vec<(String, f32)>,
    resident: bool,
}

impl<B: ZBackend> PipelineEngine<B> {
    /// Wraps `pipeline`. When every model fits in memory at once (at `resident_size`, from the
    /// same estimate `zimage generate` uses) they are loaded now and kept; otherwise each job
    /// loads them in turn, one large component at a time.
    pub fn new(
        pipeline: ZImagePipeline<B>,
        provenance: Provenance,
        lora_dir: Option<PathBuf>,
        resident_size: usize,
    ) -> Result<Self, ServerError> {
        let device_is_host = B::host_kernels(&B::Device::default());
        let mut pipeline = pipeline.keep_models(true);
        let mut options = pipeline.options("");
        options.width = resident_size;
        options.height = resident_size;
        let model_error = |e: PipelineError| ServerError::Model(e.to_string());
        let peak = |p: &ZImagePipeline<B>| -> Result<u64, ServerError> {
            Ok(p.estimate_memory(&options).map_err(model_error)?.peak())
        };
        // Device memory is not estimated: models stay resident and a job fails if the device
        // runs out. On the host: resident when everything fits, else staged per job; and, as
        // `zimage generate` does, weights stored in f32 are held in bf16 when even staged they
        // do not fit (unless a weights dtype was chosen).
        let mut resident = true;
        match memory::available_host_memory().map_err(model_error)? {
            Some(available) if device_is_host && peak(&pipeline)? > available => {
                resident = false;
                pipeline = pipeline.keep_models(false);
                let stored = pipeline.precision();
                if peak(&pipeline)? > available && stored.weights.is_none() {
                    pipeline = pipeline.with_precision(stored.with_weights(Some(DType::BF16)));
                    let staged = peak(&pipeline)?;
                    pipeline = pipeline.keep_models(true);
                    resident = peak(&pipeline)? <= available;
                    if resident || staged <= available {
                        eprintln!(
                            "holding the weights in bf16: as stored they do not fit in the {} available (--weights-dtype f32 to insist)",
                            gib(available)
                        );
                    } else {
                        pipeline = pipeline.with_precision(stored);
                    }
                }
            }
            _ => {}
        }
        pipeline = pipeline.keep_models(resident);
        if resident {
            pipeline
                .load_all(&mut |_| ControlFlow::Continue(()))
                .map_err(model_error)?;
        }
        Ok(Self {
            pipeline,
            provenance,
            lora_dir,
            loaded_adapters: HashMap::new(),
            current_adapters: Vec::new(),
            resident,
        })
    }

    /// The pipeline options of a job: what `zimage generate` builds from the same arguments.
    pub fn options(&self, spec: &JobSpec) -> GenerateOptions {
        let mut options = self.pipeline.options(spec.prompt.clone());
        options.negative_prompts = spec.negative_prompt.clone().map(|n| vec![n]);
        options.width = spec.width;
        options.height = spec.height;
        options.num_inference_steps = spec.steps;
        options.guidance_scale = spec.guidance;
        options.cfg_normalization = spec.cfg_normalization;
        options.cfg_truncation = spec.cfg_truncation;
        options.num_images_per_prompt = spec.images;
        options.shift = spec.shift;
        options.seed = spec.seed;
        match &spec.control {
            None => {
                options.init_image = spec.init.as_ref().map(|init| InitImage {
                    image: init.image.clone(),
                    strength: init.strength,
                    mask: init.mask.clone(),
                });
            }
            Some(control) => {
                options.control = Some(ControlOptions {
                    image: control.image.clone(),
                    scale: control.scale,
                    inpaint: spec.init.as_ref().and_then(|init| {
                        Some(ControlInpaint {
                            image: init.image.clone(),
                            mask: init.mask.clone()?,
                        })
                    }),
                });
            }
        }
        options
    }

    fn switch_adapters(&mut self, wanted: &[(String, f32)]) -> Result<(), JobFailure> {
        if wanted == self.current_adapters.as_slice() {
            return Ok(());
        }
        let mut adapters = Vec::with_capacity(wanted.len());
        for (name, scale) in wanted {
            let adapter = match self.loaded_adapters.get(name) {
                Some(adapter) => adapter.clone(),
                None => {
                    let dir = self.lora_dir.as_ref().ok_or_else(|| {
                        failure(
                            StatusCode::BAD_REQUEST,
                            "invalid_request",
                            "this server has no adapter folder (--lora-dir)",
                        )
                    })?;
                    let adapter = LoraAdapter::open(dir.join(format!("{name}.safetensors")))
                        .map(Arc::new)
                        .map_err(|e| {
                            failure(
                                StatusCode::BAD_REQUEST,
                                "bad_adapter",
                                format!("adapter {name}: {e}"),
                            )
                        })?;
                    self.loaded_adapters.insert(name.clone(), adapter.clone());
                    adapter
                }
            };
            adapters.push((adapter, *scale));
        }
        self.pipeline
            .set_adapters(adapters)
            .map_err(|e| failure(StatusCode::BAD_REQUEST, "bad_adapter", e.to_string()))?;
        self.current_adapters = wanted.to_vec();
        Ok(())
    }

    /// Refuses a job the host cannot hold, before anything runs.
    fn check_memory(&self, options: &GenerateOptions) -> Result<(), JobFailure> {
        if !B::host_kernels(&B::Device::default()) {
            return Ok(());
        }
        let oom = |e: PipelineError| {
            failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "out_of_memory",
                e.to_string(),
            )
        };
        let Some(available) = memory::available_host_memory().map_err(oom)? else {
            return Ok(());
        };
        let estimate = self
            .pipeline
            .estimate_memory(options)
            .map_err(|e| failure(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))?;
        // Resident weights are already out of the available figure: only the working memory
        // is still to come.
        let needed = if self.resident {
            estimate
                .stages
                .iter()
                .map(|s| s.activations)
                .max()
                .unwrap_or(0)
        } else {
            estimate.peak()
        };
        if needed > available {
            return Err(failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "out_of_memory",
                format!(
                    "this request needs about {}, and the server has {} available: ask for a smaller size or fewer images",
                    gib(needed),
                    gib(available)
                ),
            ));
        }
        Ok(())
    }
}

fn failure(status: StatusCode, code: &'static str, message: impl Into<String>) -> JobFailure {
    JobFailure {
        status,
        code,
        message: message.into(),
    }
}

impl<B: ZBackend> Engine for PipelineEngine<B> {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            name: self.provenance.model.clone(),
            variant: self.pipeline.variant(),
            size_multiple: self.pipeline.size_multiple(),
            backend: self.provenance.backend.clone(),
            dtype: self.provenance.dtype.clone(),
            resident: self.resident,
            controlnet: self.pipeline.controlnet_config().is_some(),
        }
    }

    fn run(&mut self, job: &Job) -> Result<Vec<JobImage>, RunError> {
        let Some(spec) = job.spec() else {
            return Err(RunError::Cancelled);
        };
        self.switch_adapters(&spec.loras)
            .map_err(RunError::Failed)?;
        let options = self.options(&spec);
        self.check_memory(&options).map_err(RunError::Failed)?;
        let mut callback = |event: Event<'_, B>| {
            match event {
                Event::Stage(stage) => job.set_stage(stage.describe()),
                Event::Step {
                    step,
                    total,
                    latents,
                } => {
                    // A preview costs a device read each step: only for someone watching.
                    let preview = if job.watchers() > 0 {
                        preview_of(latents)
                    } else {
                        None
                    };
                    job.set_step(step, total, preview);
                }
                Event::Loaded { .. } => {}
            }
            if job.cancel_requested() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let generation = match self.pipeline.generate(&options, &mut callback) {
            Ok(generation) => generation,
            Err(PipelineError::Cancelled { .. }) => return Err(RunError::Cancelled),
            Err(e) => {
                let (status, code) = match &e {
                    PipelineError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
                    PipelineError::OutOfMemory { .. } => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "out_of_memory")
                    }
                    _ => (StatusCode::INTERNAL_SERVER_ERROR, "generation_failed"),
                };
                return Err(RunError::Failed(failure(status, code, e.to_string())));
            }
        };
        let mut provenance = self.provenance.clone();
        provenance.loras = spec
            .loras
            .iter()
            .map(|(name, scale)| (format!("{name}.safetensors"), *scale))
            .collect();
        let parameters = record::parameters(&options, &provenance).to_string();
        generation
            .images
            .iter()
            .map(|image| {
                let png = record::png_with_parameters(image, &parameters).map_err(|e| {
                    RunError::Failed(failure(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "encoding_failed",
                        format!("PNG encoding: {e}"),
                    ))
                })?;
                Ok(JobImage {
                    png: Arc::new(png),
                    parameters: parameters.clone(),
                })
            })
            .collect()
    }
}

/// A data-URL PNG of the first image's latents, or `None` if they cannot be read.
fn preview_of<B: ZBackend>(latents: &Tensor<B, 4>) -> Option<String> {
    let [_, channels, height, width] = latents.dims();
    let first = latents.clone().slice([0..1]);
    let values = first.into_data().convert::<f32>().to_vec::<f32>().ok()?;
    preview::data_url(&values, channels, height, width)
}

/// Starts the worker thread: it builds the engine with `factory` (on its own thread, so the
/// engine need not be `Send`), reports the model or the failure, then runs jobs until the queue
/// closes. A panic inside a job fails that job; the worker goes on.
pub fn spawn_worker<F>(
    queue: Arc<Queue>,
    factory: F,
) -> Result<(ModelInfo, std::thread::JoinHandle<()>), ServerError>
where
    F: FnOnce() -> Result<Box<dyn Engine>, ServerError> + Send + 'static,
{
    let (ready, started) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("zimage-worker".into())
        .spawn(move || {
            let mut engine = match factory() {
                Ok(engine) => {
                    let _ = ready.send(Ok(engine.info()));
                    engine
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            while let Some(job) = queue.next() {
                let outcome = if job.cancel_requested() {
                    Outcome::Cancelled
                } else {
                    let run =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run(&job)));
                    match run {
                        Ok(Ok(images)) => Outcome::Succeeded(images),
                        Ok(Err(RunError::Cancelled)) => Outcome::Cancelled,
                        Ok(Err(RunError::Failed(f))) => Outcome::Failed(f),
                        Err(panic) => {
                            let text = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "unknown".into());
                            Outcome::Failed(failure(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "internal_error",
                                format!("the generation failed: {text}"),
                            ))
                        }
                    }
                };
                queue.finish(&job, outcome);
            }
        })
        .map_err(|e| ServerError::Runtime(format!("cannot start the worker thread: {e}")))?;
    match started.recv() {
        Ok(Ok(info)) => Ok((info, handle)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ServerError::Model(
            "the worker stopped while loading".into(),
        )),
    }
}
