//! The web page, `/health` and `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::AppState;

/// The page: one file, built into the binary (no build step, no network).
const INDEX: &str = include_str!("../../web/index.html");

/// `GET /`.
pub async fn index() -> Html<&'static str> {
    Html(INDEX)
}

/// `GET /health`: open (no key), for load balancers.
pub async fn health(State(shared): State<AppState>) -> Json<Value> {
    let (waiting, running) = shared.queue.depth();
    Json(json!({
        "status": "ok",
        "model": shared.info.name,
        "variant": shared.info.variant.name(),
        "backend": shared.info.backend,
        "dtype": shared.info.dtype,
        "resident": shared.info.resident,
        "controlnet": shared.info.controlnet,
        "size_multiple": shared.info.size_multiple,
        "default_steps": shared.info.variant.default_steps(),
        "default_guidance": shared.info.variant.default_guidance(),
        "max_side": shared.config.limits.max_side,
        "max_steps": shared.config.limits.max_steps,
        "max_images": shared.config.limits.max_images,
        "auth": shared.config.api_key.is_some(),
        "queue": {"waiting": waiting, "running": running, "capacity": shared.config.limits.max_queue},
        "uptime_seconds": shared.started.elapsed().as_secs(),
    }))
}

/// The process's resident memory, from `/proc` where there is one.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(shared): State<AppState>) -> Response {
    let c = &shared.queue.counters;
    let (waiting, running) = shared.queue.depth();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    metric(
        "zimage_jobs_submitted_total",
        "counter",
        "Jobs accepted into the queue.",
        &[("", get(&c.submitted))],
    );
    metric(
        "zimage_jobs_rejected_total",
        "counter",
        "Requests refused because the queue was full (429).",
        &[("{reason=\"queue_full\"}", get(&c.rejected_full))],
    );
    metric(
        "zimage_jobs_finished_total",
        "counter",
        "Jobs finished, by outcome.",
        &[
            ("{state=\"succeeded\"}", get(&c.succeeded)),
            ("{state=\"failed\"}", get(&c.failed)),
            ("{state=\"cancelled\"}", get(&c.cancelled)),
        ],
    );
    metric(
        "zimage_images_generated_total",
        "counter",
        "Images made.",
        &[("", get(&c.images))],
    );
    metric(
        "zimage_job_run_seconds_total",
        "counter",
        "Seconds spent running jobs.",
        &[("", get(&c.run_micros) / 1e6)],
    );
    metric(
        "zimage_http_client_errors_total",
        "counter",
        "Requests answered with a 4xx status.",
        &[("", get(&c.bad_requests))],
    );
    metric(
        "zimage_queue_waiting",
        "gauge",
        "Jobs waiting to run.",
        &[("", waiting as f64)],
    );
    metric(
        "zimage_queue_capacity",
        "gauge",
        "Jobs that may wait before requests get 429.",
        &[("", shared.config.limits.max_queue as f64)],
    );
    metric(
        "zimage_jobs_running",
        "gauge",
        "Jobs running (0 or 1 per device).",
        &[("", running as u8 as f64)],
    );
    metric(
        "zimage_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        &[("", shared.started.elapsed().as_secs_f64())],
    );
    if let Some(bytes) = resident_bytes() {
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the server process.",
            &[("", bytes as f64)],
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Counts the requests answered with a 4xx, for `/metrics`.
pub async fn count_client_errors(
    State(shared): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    if response.status().is_client_error() {
        shared
            .queue
            .counters
            .bad_requests
            .fetch_add(1, Ordering::Relaxed);
    }
    response
}
