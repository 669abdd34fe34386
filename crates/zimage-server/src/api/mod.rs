//! The routes, by API family.

pub mod a1111;
pub mod native;
pub mod openai;
pub mod page;

use std::sync::Arc;

use axum::http::StatusCode;

use crate::error::ApiError;
use crate::jobs::{Job, JobSpec, JobState, Queue, Refused};
use crate::AppState;

/// Queues `spec`, or answers 429 when the queue is full.
pub fn submit(shared: &AppState, spec: JobSpec) -> Result<Arc<Job>, ApiError> {
    shared.queue.submit(spec).map_err(|refused| match refused {
        Refused::Full { waiting } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("the queue is full ({waiting} jobs waiting); retry later"),
        ),
        Refused::Closed => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the server is stopping",
        ),
    })
}

/// Runs CPU-heavy request work (decoding uploads, encoding answers) off the async threads, a
/// bounded number at a time, so that uploads neither stall other routes nor pile up in memory.
pub async fn blocking<T: Send + 'static>(
    shared: &AppState,
    work: impl FnOnce(&crate::Shared) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = shared.decode_permits.acquire().await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "the server is stopping",
        )
    })?;
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || work(&shared))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                format!("request work failed: {e}"),
            )
        })?
}

/// Cancels the job if the request that waits on it goes away (the client disconnected):
/// nobody else can be waiting for the result of a synchronous request.
struct CancelOnDrop {
    queue: Arc<Queue>,
    job: Option<Arc<Job>>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            self.queue.cancel(&job);
        }
    }
}

/// Queues `spec` and waits for it: the finished job, or its failure as the response.
pub async fn run_to_end(shared: &AppState, spec: JobSpec) -> Result<Arc<Job>, ApiError> {
    let job = submit(shared, spec)?;
    let mut guard = CancelOnDrop {
        queue: shared.queue.clone(),
        job: Some(job.clone()),
    };
    job.finished().await;
    guard.job = None;
    let status = job.status();
    match status.state {
        JobState::Succeeded => Ok(job),
        JobState::Failed => {
            let failure = status.failure.expect("a failed job has its failure");
            Err(ApiError::new(failure.status, failure.code, failure.message))
        }
        // Stopping is the server's doing (another replica may answer: 503); a cancel by id or
        // an interrupt is a client's, and retrying it elsewhere would be wrong (409).
        _ if shared.queue.is_closed() => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_stopping",
            "the job was cancelled: the server is stopping",
        )),
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            "cancelled",
            "the job was cancelled (DELETE /v1/jobs/{id} or /sdapi/v1/interrupt)",
        )),
    }
}

/// The finished images of a job, base64-encoded PNGs.
pub fn base64_images(job: &Job) -> Vec<String> {
    use base64::Engine as _;
    job.status()
        .images
        .iter()
        .map(|image| base64::engine::general_purpose::STANDARD.encode(image.png.as_slice()))
        .collect()
}
