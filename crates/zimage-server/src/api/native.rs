//! The native jobs API: submit, watch (server-sent events with previews), fetch, cancel.

use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use crate::error::ApiError;
use crate::request::{available_loras, GenerationFields};
use crate::{ApiJson, AppState};

fn job(shared: &AppState, id: &str) -> Result<std::sync::Arc<crate::jobs::Job>, ApiError> {
    shared.queue.get(id).ok_or_else(|| {
        ApiError::not_found(format!(
            "no job {id} (finished jobs are kept for a while, then forgotten)"
        ))
    })
}

/// `GET /v1/loras`: the adapters clients may name.
pub async fn loras(State(shared): State<AppState>) -> Json<Value> {
    let names = available_loras(&shared);
    Json(
        json!({"object": "list", "data": names.iter().map(|n| json!({"name": n})).collect::<Vec<_>>()}),
    )
}

/// `POST /v1/jobs`: 202 with the job record; its progress is at `/v1/jobs/{id}/events`.
pub async fn submit(
    State(shared): State<AppState>,
    ApiJson(fields): ApiJson<GenerationFields>,
) -> Result<Response, ApiError> {
    let spec = super::blocking(&shared, move |s| fields.into_spec(s)).await?;
    let job = super::submit(&shared, spec)?;
    let location = format!("/v1/jobs/{}", job.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(job.record()),
    )
        .into_response())
}

/// `GET /v1/jobs/{id}`.
pub async fn status(
    State(shared): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(job(&shared, &id)?.record()))
}

/// `DELETE /v1/jobs/{id}`: a queued job is cancelled at once, a running one after its current
/// step (the record says `running` until then).
pub async fn cancel(
    State(shared): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = job(&shared, &id)?;
    shared.queue.cancel(&job);
    Ok((StatusCode::ACCEPTED, Json(job.record())).into_response())
}

/// `GET /v1/jobs/{id}/images/{index}`: a PNG with the parameters embedded.
pub async fn image(
    State(shared): State<AppState>,
    Path((id, index)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let job = job(&shared, &id)?;
    let index: usize = index
        .parse()
        .map_err(|_| ApiError::not_found(format!("image {index:?} is not an image number")))?;
    let status = job.status();
    let image = status.images.get(index).ok_or_else(|| {
        ApiError::not_found(format!(
            "job {id} has no image {index} (it is {}, with {} images)",
            status.state.name(),
            status.images.len()
        ))
    })?;
    let disposition = format!("inline; filename=\"{id}-{index}.png\"");
    Ok((
        [
            (header::CONTENT_TYPE, "image/png".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::CACHE_CONTROL, "private, max-age=3600".to_string()),
        ],
        image.png.as_slice().to_vec(),
    )
        .into_response())
}

/// `GET /v1/jobs/{id}/events`: server-sent events. First `state` with the whole record, then
/// `stage` and `progress` (step, total, a preview as a data URL) as the job runs, and one final
/// `succeeded`, `failed` or `cancelled`; then the stream ends.
pub async fn events(
    State(shared): State<AppState>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = job(&shared, &id)?;
    // Subscribe before reading the state: nothing between the two is missed.
    let receiver = job.subscribe();
    let record = job.record();
    let finished = job.status().state.is_final();
    let first = Event::default()
        .event("state")
        .json_data(&record)
        .unwrap_or_default();
    let stream = stream::unfold(
        (Some(first), receiver, finished),
        |(first, mut receiver, finished)| async move {
            if let Some(first) = first {
                return Some((Ok(first), (None, receiver, finished)));
            }
            if finished {
                return None;
            }
            loop {
                match receiver.recv().await {
                    Ok(event) => {
                        let last = matches!(event.name, "succeeded" | "failed" | "cancelled");
                        let sse = Event::default()
                            .event(event.name)
                            .json_data(&event.data)
                            .unwrap_or_default();
                        return Some((Ok(sse), (None, receiver, last)));
                    }
                    // A slow reader skips previews rather than holding the job back.
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
