//! `zimage serve`: the HTTP server (crates/zimage-server) over a pipeline built from the same
//! model arguments as `zimage generate`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use zimage_nn::{Precision, ZBackend};
use zimage_pipeline::record::Provenance;
use zimage_pipeline::{ModelFiles, ZImagePipeline};
use zimage_server::{Engine, Limits, PipelineEngine, Server, ServerConfig, ServerError};

use crate::backend::{self, BackendChoice, DtypeChoice};
use crate::generate::{open_model, ModelArgs};
use crate::with_backend;

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on; anything but a loopback address needs --api-key (or
    /// --insecure-no-auth).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Clients must send `Authorization: Bearer KEY` [env: ZIMAGE_API_KEY]
    #[arg(long, env = "ZIMAGE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Serve without a key on a non-loopback address (anyone who reaches it can generate).
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Allow browser calls from this origin (CORS); repeat for several. Off by default.
    #[arg(long, value_name = "ORIGIN")]
    pub cors_origin: Vec<String>,
    /// Adapters clients may name: the .safetensors files of this folder (clients give names,
    /// never paths).
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// A Z-Image ControlNet (Fun-ControlNet-Union single file): requests may then give a
    /// control_image (and control_scale, canny).
    #[arg(long, value_name = "FILE")]
    pub controlnet: Option<PathBuf>,
    /// Jobs that may wait; past it, requests get 429.
    #[arg(long, default_value_t = Limits::default().max_queue)]
    pub max_queue: usize,
    /// Largest width or height a client may ask for.
    #[arg(long, default_value_t = Limits::default().max_side)]
    pub max_side: usize,
    #[arg(long, default_value_t = Limits::default().max_steps)]
    pub max_steps: usize,
    /// Most images per request.
    #[arg(long, default_value_t = Limits::default().max_images)]
    pub max_images: usize,
    /// Largest request body, in MiB (uploads included).
    #[arg(long, default_value_t = Limits::default().max_body_bytes >> 20)]
    pub max_body_mib: usize,
    /// The size the resident-memory decision is made at: models stay loaded between jobs when
    /// a job of this size fits with all of them resident; otherwise each job loads them in turn.
    #[arg(long, default_value_t = 1024)]
    pub resident_size: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// Compute dtype [default: bf16 on cuda, f32 elsewhere]
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeChoice>,
    /// What weight matrices are held in [default: as stored in the files]
    #[arg(long, value_enum)]
    pub weights_dtype: Option<DtypeChoice>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.max_queue == 0 || args.max_images == 0 || args.max_steps == 0 || args.max_side == 0 {
        bail!("--max-queue, --max-images, --max-steps and --max-side must be at least 1");
    }
    let backend = backend::resolve(args.backend)?;
    let dtype = args
        .dtype
        .map(DtypeChoice::dtype)
        .unwrap_or(backend.default_dtype());
    backend.check_dtype(dtype)?;
    if let Some(weights) = args.weights_dtype {
        backend.check_weights_dtype(weights.dtype())?;
    }
    let files = open_model(&args.model, false)?;
    let config = ServerConfig {
        limits: Limits {
            max_queue: args.max_queue,
            max_side: args.max_side,
            max_steps: args.max_steps,
            max_images: args.max_images,
            max_body_bytes: args.max_body_mib << 20,
            ..Limits::default()
        },
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        cors_origins: args.cors_origin.clone(),
        lora_dir: args.lora_dir.clone(),
    };
    let provenance = Provenance {
        model: args.model.label(),
        variant: files.variant(),
        backend: backend.name().into(),
        dtype: backend::dtype_name(dtype).into(),
        loras: Vec::new(),
        controlnet: args
            .controlnet
            .as_ref()
            .and_then(|f| f.file_name())
            .map(|n| n.to_string_lossy().into_owned()),
    };
    let precision = Precision::from(dtype).with_weights(args.weights_dtype.map(DtypeChoice::dtype));
    let address = SocketAddr::new(args.host, args.port);
    let lora_dir = args.lora_dir.clone();
    let controlnet = args.controlnet.clone();
    let resident_size = args.resident_size;
    eprintln!(
        "Z-Image {} ({}), {} {}: loading",
        files.variant_choice().variant.name(),
        files.variant_choice().reason,
        backend.name(),
        backend::dtype_name(dtype)
    );
    let server = with_backend!(backend, |B| start::<B>(
        config,
        address,
        args.insecure_no_auth,
        files,
        precision,
        provenance,
        lora_dir,
        controlnet,
        resident_size
    ))?;
    let info = &server.info;
    eprintln!(
        "models {}",
        if info.resident {
            "resident"
        } else {
            "loaded per job (they do not all fit in memory at once)"
        }
    );
    // The one line on stdout: scripts (and the tests) read the address from it.
    println!("listening on http://{}", server.address);
    server.run_until_signal().context("serving")?;
    eprintln!("stopped");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn start<B: ZBackend>(
    config: ServerConfig,
    address: SocketAddr,
    allow_no_auth: bool,
    files: ModelFiles,
    precision: Precision,
    provenance: Provenance,
    lora_dir: Option<PathBuf>,
    controlnet: Option<PathBuf>,
    resident_size: usize,
) -> Result<Server> {
    let server = Server::start(config, address, allow_no_auth, move || {
        let device = B::Device::default();
        let mut pipeline = ZImagePipeline::<B>::new(files, &device, precision)
            .map_err(|e| ServerError::Model(e.to_string()))?;
        if let Some(file) = &controlnet {
            pipeline
                .set_controlnet(Some(file))
                .map_err(|e| ServerError::Model(e.to_string()))?;
        }
        let engine = PipelineEngine::new(pipeline, provenance, lora_dir, resident_size)?;
        Ok(Box::new(engine) as Box<dyn Engine>)
    })?;
    Ok(server)
}
