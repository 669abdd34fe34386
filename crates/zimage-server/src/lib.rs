//! `zimage serve`: a resident Z-Image pipeline behind the HTTP APIs clients already speak.
//!
//! - OpenAI Images: `POST /v1/images/generations`, `POST /v1/images/edits` (multipart: image,
//!   optional mask), `GET /v1/models`;
//! - A1111: `POST /sdapi/v1/txt2img`, `POST /sdapi/v1/img2img` and the lookups clients make first;
//! - native jobs: `POST /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/events` (server-sent
//!   progress with step previews), `GET /v1/jobs/{id}/images/{i}`, `DELETE /v1/jobs/{id}`;
//! - `GET /health`, `GET /metrics` (Prometheus), `GET /v1/loras`, and the web page at `/`.
//!
//! One job runs at a time on the device ([`engine::spawn_worker`]); the rest wait in a bounded
//! queue ([`jobs::Queue`], 429 past it). Every bad request gets a 4xx with a JSON error.

mod api;
pub mod config;
pub mod engine;
mod error;
pub mod jobs;
pub mod preview;
mod request;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;

pub use config::{Limits, ServerConfig};
pub use engine::{Engine, ModelInfo, PipelineEngine};
pub use error::{ApiError, ServerError};
pub use request::{GenerationFields, LoraRef};

/// What every handler shares.
pub struct Shared {
    pub config: ServerConfig,
    pub info: ModelInfo,
    pub queue: Arc<jobs::Queue>,
    pub started: Instant,
    /// Bounds the uploads decoded (and answers encoded) at once.
    pub decode_permits: tokio::sync::Semaphore,
}

pub type AppState = Arc<Shared>;

/// The whole HTTP surface over `shared`.
pub fn router(shared: AppState) -> Router {
    use axum::routing::{get, post};
    let limits = &shared.config.limits;
    let api = Router::new()
        .route("/v1/models", get(api::openai::models))
        .route("/v1/images/generations", post(api::openai::generations))
        .route("/v1/images/edits", post(api::openai::edits))
        .route("/v1/loras", get(api::native::loras))
        .route("/v1/jobs", post(api::native::submit))
        .route(
            "/v1/jobs/{id}",
            get(api::native::status).delete(api::native::cancel),
        )
        .route("/v1/jobs/{id}/events", get(api::native::events))
        .route("/v1/jobs/{id}/images/{index}", get(api::native::image))
        .route("/sdapi/v1/txt2img", post(api::a1111::txt2img))
        .route("/sdapi/v1/img2img", post(api::a1111::img2img))
        .route("/sdapi/v1/sd-models", get(api::a1111::sd_models))
        .route("/sdapi/v1/samplers", get(api::a1111::samplers))
        .route("/sdapi/v1/options", get(api::a1111::options))
        .route("/sdapi/v1/progress", get(api::a1111::progress))
        .route("/sdapi/v1/interrupt", post(api::a1111::interrupt))
        .route("/metrics", get(api::page::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            authenticate,
        ));
    let mut app = Router::new()
        .route("/", get(api::page::index))
        .route("/health", get(api::page::health))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            api::page::count_client_errors,
        ));
    if !shared.config.cors_origins.is_empty() {
        use tower_http::cors::{AllowOrigin, CorsLayer};
        // Checked by `Server::start` (`cors_origin`): every origin parses.
        let allow = if shared.config.cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(
                shared
                    .config
                    .cors_origins
                    .iter()
                    .filter_map(|o| cors_origin(o).ok()),
            )
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods(tower_http::cors::Any)
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    app.with_state(shared)
}

/// A CORS origin as the header carries it: `*`, or `scheme://host[:port]` (no path).
fn cors_origin(origin: &str) -> Result<header::HeaderValue, ServerError> {
    let bad = || ServerError::CorsOrigin(origin.to_string());
    if origin == "*" {
        return Ok(header::HeaderValue::from_static("*"));
    }
    let (scheme, rest) = origin.split_once("://").ok_or_else(bad)?;
    if scheme.is_empty()
        || rest.is_empty()
        || rest.contains('/')
        || origin.contains(char::is_whitespace)
    {
        return Err(bad());
    }
    origin.parse().map_err(|_| bad())
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
}

/// `Authorization: Bearer <key>` on every API route when the server has a key.
async fn authenticate(State(shared): State<AppState>, request: Request, next: Next) -> Response {
    use axum::response::IntoResponse;
    if let Some(key) = &shared.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this server needs `Authorization: Bearer <api key>`",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Equal-length comparison that takes the same time wherever the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `axum::Json` whose rejections (bad JSON, wrong content type, body too large) are JSON errors.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => {
                let status = rejection.status();
                let code = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                    _ => "invalid_json",
                };
                Err(ApiError::new(status, code, rejection.body_text()))
            }
        }
    }
}

/// A running server: its address, and the handle that stops it.
pub struct Server {
    pub address: SocketAddr,
    pub info: ModelInfo,
    pub shared: AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Builds the engine (on the worker thread), binds `address` and serves on a background
    /// thread. A non-loopback address needs an API key unless `allow_no_auth`.
    pub fn start<F>(
        config: ServerConfig,
        address: SocketAddr,
        allow_no_auth: bool,
        factory: F,
    ) -> Result<Self, ServerError>
    where
        F: FnOnce() -> Result<Box<dyn Engine>, ServerError> + Send + 'static,
    {
        if config
            .api_key
            .as_deref()
            .is_some_and(|k| k.trim().is_empty())
        {
            return Err(ServerError::EmptyApiKey);
        }
        for origin in &config.cors_origins {
            cors_origin(origin)?;
        }
        if !address.ip().is_loopback() && config.api_key.is_none() && !allow_no_auth {
            return Err(ServerError::Unauthenticated(address.to_string()));
        }
        if let Some(dir) = &config.lora_dir {
            if !dir.is_dir() {
                return Err(ServerError::LoraDir(dir.clone(), "not a folder".into()));
            }
        }
        // Bind before loading: a taken port fails at once, not after minutes of loading.
        let listener =
            std::net::TcpListener::bind(address).map_err(|source| ServerError::Bind {
                address: address.to_string(),
                source,
            })?;
        let address = listener.local_addr().map_err(|source| ServerError::Bind {
            address: address.to_string(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ServerError::Runtime(e.to_string()))?;
        let queue = Arc::new(jobs::Queue::new(
            config.limits.max_queue,
            config.limits.keep_finished,
        ));
        let (info, worker) = engine::spawn_worker(queue.clone(), factory)?;
        let shared = Arc::new(Shared {
            config,
            info: info.clone(),
            queue: queue.clone(),
            started: Instant::now(),
            decode_permits: tokio::sync::Semaphore::new(2),
        });
        let app = router(shared.clone());
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("zimage-http")
            .build()
            .map_err(|e| ServerError::Runtime(format!("cannot start the async runtime: {e}")))?;
        let listener = runtime
            .block_on(async { tokio::net::TcpListener::from_std(listener) })
            .map_err(|e| ServerError::Runtime(e.to_string()))?;
        let thread = std::thread::Builder::new()
            .name("zimage-server".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let served = axum::serve(listener, app.into_make_service())
                        .with_graceful_shutdown(async move {
                            let _ = stop.await;
                        })
                        .await;
                    if let Err(e) = served {
                        eprintln!("error: the server stopped: {e}");
                    }
                });
                queue.close();
            })
            .map_err(|e| ServerError::Runtime(e.to_string()))?;
        Ok(Self {
            address,
            info,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
            worker: Some(worker),
        })
    }

    /// Serves until Ctrl-C (or SIGTERM), then stops taking requests and lets the running job end.
    pub fn run_until_signal(mut self) -> Result<(), ServerError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ServerError::Runtime(e.to_string()))?;
        runtime.block_on(async {
            #[cfg(unix)]
            {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .map_err(|e| ServerError::Runtime(e.to_string()))?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            #[cfg(not(unix))]
            let _ = tokio::signal::ctrl_c().await;
            Ok::<(), ServerError>(())
        })?;
        self.stop();
        Ok(())
    }

    /// Stops serving and waits for the threads.
    pub fn stop(&mut self) {
        // The queue first: whoever waits on a job is answered, so open requests can end.
        self.shared.queue.close();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
