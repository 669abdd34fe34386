//! Jobs and their queue: one job runs at a time per device, the rest wait in a bounded queue;
//! every job's progress is broadcast to whoever watches it, and finished jobs are kept, up to a
//! bound, for their results.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use image::{GrayImage, RgbImage};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

/// A validated request, ready to run: every default filled, the seed chosen.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f32,
    pub cfg_normalization: f32,
    pub cfg_truncation: f64,
    pub seed: u64,
    /// Images of the prompt, all from the one seed (as `zimage generate --num-images`).
    pub images: usize,
    pub shift: Option<f64>,
    /// Adapter names (files of the adapter folder, without `.safetensors`) and scales.
    pub loras: Vec<(String, f32)>,
    pub init: Option<InitSpec>,
    /// ControlNet control (the server's ControlNet); with `init` it is ControlNet inpainting.
    pub control: Option<ControlSpec>,
}

#[derive(Debug, Clone)]
pub struct ControlSpec {
    pub image: RgbImage,
    pub scale: f32,
}

#[derive(Debug, Clone)]
pub struct InitSpec {
    pub image: RgbImage,
    pub strength: f64,
    /// White repaints, black keeps.
    pub mask: Option<GrayImage>,
}

impl JobSpec {
    /// The request as the job record shows it (images are left out).
    pub fn summary(&self) -> Value {
        json!({
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance": self.guidance,
            "cfg_normalization": self.cfg_normalization,
            "cfg_truncation": self.cfg_truncation,
            "seed": self.seed,
            "n": self.images,
            "shift": self.shift,
            "loras": self.loras.iter().map(|(name, scale)| json!({"name": name, "scale": scale})).collect::<Vec<_>>(),
            "strength": self.init.as_ref().filter(|_| self.control.is_none()).map(|i| i.strength),
            "control_scale": self.control.as_ref().map(|c| c.scale),
            "mode": match (&self.init, &self.control) {
                (None, None) => "text-to-image",
                (None, Some(_)) => "controlnet",
                (Some(_), Some(_)) => "controlnet inpainting",
                (Some(InitSpec { mask: None, .. }), None) => "image-to-image",
                (Some(_), None) => "inpainting",
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// One finished image: PNG bytes with the parameters embedded.
#[derive(Debug, Clone)]
pub struct JobImage {
    pub png: Arc<Vec<u8>>,
    /// The JSON written into the PNG.
    pub parameters: String,
}

/// Why a job failed, with the status a synchronous request answers with.
#[derive(Debug, Clone)]
pub struct JobFailure {
    pub status: axum::http::StatusCode,
    pub code: &'static str,
    pub message: String,
}

/// A job's state as the API shows it.
#[derive(Debug, Clone)]
pub struct JobStatus {
    pub state: JobState,
    /// What a running job is doing ("denoising", "decoding", ...).
    pub stage: Option<&'static str>,
    pub step: usize,
    pub total: usize,
    pub images: Vec<JobImage>,
    pub failure: Option<JobFailure>,
    pub started: Option<Instant>,
    pub finished: Option<Instant>,
}

/// What watchers of a job receive (server-sent events carry `name` and `data`).
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub name: &'static str,
    pub data: Value,
}

/// A job: its request, its state, and the channels its progress travels on.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    /// The request, until the job finishes: its decoded uploads (up to tens of MB each) are
    /// not kept with the finished jobs' records.
    spec: Mutex<Option<Arc<JobSpec>>>,
    /// [`JobSpec::summary`], for the record.
    summary: Value,
    /// Seconds since the epoch at submission.
    pub created: u64,
    cancel: AtomicBool,
    status: Mutex<JobStatus>,
    events: broadcast::Sender<JobEvent>,
    done: watch::Sender<bool>,
}

impl Job {
    /// The request; `None` once the job has finished.
    pub fn spec(&self) -> Option<Arc<JobSpec>> {
        self.spec.lock().expect("job spec lock").clone()
    }

    pub fn status(&self) -> JobStatus {
        self.status.lock().expect("job status lock").clone()
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Progress from now on; subscribe before reading [`Self::status`] to miss nothing.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    /// How many are watching the job's progress now.
    pub fn watchers(&self) -> usize {
        self.events.receiver_count()
    }

    /// Resolves once the job is finished, however it finished.
    pub async fn finished(&self) {
        let mut done = self.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
    }

    fn emit(&self, name: &'static str, data: Value) {
        // No watcher is not an error.
        let _ = self.events.send(JobEvent { name, data });
    }

    /// The job record of `GET /v1/jobs/{id}`.
    pub fn record(&self) -> Value {
        let status = self.status();
        let images: Vec<String> = (0..status.images.len())
            .map(|i| format!("/v1/jobs/{}/images/{i}", self.id))
            .collect();
        json!({
            "id": self.id,
            "state": status.state,
            "stage": status.stage,
            "step": status.step,
            "total": status.total,
            "created": self.created,
            "seconds": status.started.map(|s| status.finished.unwrap_or_else(Instant::now).duration_since(s).as_secs_f64()),
            "request": self.summary,
            "images": images,
            "parameters": status.images.iter().map(|i| serde_json::from_str::<Value>(&i.parameters).unwrap_or(Value::Null)).collect::<Vec<_>>(),
            "error": status.failure.as_ref().map(|f| json!({"message": f.message, "code": f.code})),
        })
    }

    /// Called by the worker as the job moves on.
    pub fn set_stage(&self, stage: &'static str) {
        self.status.lock().expect("job status lock").stage = Some(stage);
        self.emit("stage", json!({"stage": stage}));
    }

    pub fn set_step(&self, step: usize, total: usize, preview: Option<String>) {
        {
            let mut status = self.status.lock().expect("job status lock");
            status.step = step;
            status.total = total;
        }
        self.emit(
            "progress",
            json!({"step": step, "total": total, "preview": preview}),
        );
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub submitted: AtomicU64,
    pub rejected_full: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
    pub images: AtomicU64,
    /// Microseconds spent running jobs (start to finish).
    pub run_micros: AtomicU64,
    pub bad_requests: AtomicU64,
}

#[derive(Debug)]
struct Inner {
    pending: VecDeque<Arc<Job>>,
    running: Option<Arc<Job>>,
    jobs: HashMap<String, Arc<Job>>,
    finished: VecDeque<String>,
    closed: bool,
    next_id: u64,
}

/// The bounded queue between the HTTP handlers and the worker that owns the device.
#[derive(Debug)]
pub struct Queue {
    inner: Mutex<Inner>,
    wake: Condvar,
    max_queue: usize,
    keep_finished: usize,
    /// Mixed into job ids, so that ids from different runs (replicas) differ.
    salt: u64,
    pub counters: Counters,
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum Refused {
    /// The queue is full: the request may be retried later.
    Full { waiting: usize },
    /// The server is stopping.
    Closed,
}

impl Queue {
    pub fn new(max_queue: usize, keep_finished: usize) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        Self {
            inner: Mutex::new(Inner {
                pending: VecDeque::new(),
                running: None,
                jobs: HashMap::new(),
                finished: VecDeque::new(),
                closed: false,
                next_id: 0,
            }),
            wake: Condvar::new(),
            max_queue,
            keep_finished,
            salt: hasher.finish(),
            counters: Counters::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("queue lock")
    }

    /// Queues a job, or refuses when `max_queue` jobs already wait.
    pub fn submit(&self, spec: JobSpec) -> Result<Arc<Job>, Refused> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(Refused::Closed);
        }
        if inner.pending.len() >= self.max_queue {
            self.counters.rejected_full.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::Full {
                waiting: inner.pending.len(),
            });
        }
        inner.next_id += 1;
        // Unique (the counter is hashed in) and not derivable from another job's id: 128 bits
        // from freshly keyed hashers.
        let id = {
            use std::hash::{BuildHasher, Hasher};
            let word = |k: u64| {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u64(self.salt ^ k);
                h.write_u64(inner.next_id);
                h.finish()
            };
            format!("job-{:016x}{:016x}", word(1), word(2))
        };
        let (events, _) = broadcast::channel(256);
        let (done, _) = watch::channel(false);
        let job = Arc::new(Job {
            id: id.clone(),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            cancel: AtomicBool::new(false),
            status: Mutex::new(JobStatus {
                state: JobState::Queued,
                stage: None,
                step: 0,
                total: spec.steps,
                images: Vec::new(),
                failure: None,
                started: None,
                finished: None,
            }),
            summary: spec.summary(),
            spec: Mutex::new(Some(Arc::new(spec))),
            events,
            done,
        });
        inner.jobs.insert(id, job.clone());
        inner.pending.push_back(job.clone());
        self.counters.submitted.fetch_add(1, Ordering::Relaxed);
        drop(inner);
        self.wake.notify_one();
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.lock().jobs.get(id).cloned()
    }

    /// Cancels a job: a queued one leaves the queue at once, a running one stops after its
    /// current step. Finished jobs are left as they are.
    pub fn cancel(&self, job: &Arc<Job>) {
        job.cancel.store(true, Ordering::Relaxed);
        let mut inner = self.lock();
        if let Some(at) = inner.pending.iter().position(|j| j.id == job.id) {
            inner.pending.remove(at);
            self.finish_locked(&mut inner, job, Outcome::Cancelled);
        }
    }

    /// Jobs waiting, and whether one runs.
    pub fn depth(&self) -> (usize, bool) {
        let inner = self.lock();
        (inner.pending.len(), inner.running.is_some())
    }

    /// Whether [`Self::close`] was called (the server is stopping).
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The job that runs now, if any.
    pub fn running(&self) -> Option<Arc<Job>> {
        self.lock().running.clone()
    }

    /// Stops handing out jobs (the worker's [`Self::next`] returns `None`): waiting jobs are
    /// cancelled, and the running one stops after its current step, so that nobody waits on a
    /// job that will never run.
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        while let Some(job) = inner.pending.pop_front() {
            job.cancel.store(true, Ordering::Relaxed);
            self.finish_locked(&mut inner, &job, Outcome::Cancelled);
        }
        if let Some(job) = &inner.running {
            job.cancel.store(true, Ordering::Relaxed);
        }
        drop(inner);
        self.wake.notify_all();
    }

    /// The next job, marked running; blocks until one is queued, or `None` once closed.
    pub fn next(&self) -> Option<Arc<Job>> {
        let mut inner = self.lock();
        loop {
            if inner.closed {
                return None;
            }
            if let Some(job) = inner.pending.pop_front() {
                inner.running = Some(job.clone());
                {
                    let mut status = job.status.lock().expect("job status lock");
                    status.state = JobState::Running;
                    status.started = Some(Instant::now());
                }
                job.emit("state", json!({"state": "running"}));
                return Some(job);
            }
            inner = self
                .wake
                .wait_timeout(inner, Duration::from_secs(1))
                .expect("queue lock")
                .0;
        }
    }

    /// Records how a job ended and wakes everyone waiting on it.
    pub fn finish(&self, job: &Arc<Job>, outcome: Outcome) {
        let mut inner = self.lock();
        if inner.running.as_ref().is_some_and(|r| r.id == job.id) {
            inner.running = None;
        }
        self.finish_locked(&mut inner, job, outcome);
    }

    fn finish_locked(&self, inner: &mut Inner, job: &Arc<Job>, outcome: Outcome) {
        let (state, event) = {
            let mut status = job.status.lock().expect("job status lock");
            if status.state.is_final() {
                return;
            }
            job.spec.lock().expect("job spec lock").take();
            status.finished = Some(Instant::now());
            status.stage = None;
            if let Some(started) = status.started {
                self.counters
                    .run_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            match outcome {
                Outcome::Succeeded(images) => {
                    self.counters.succeeded.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .images
                        .fetch_add(images.len() as u64, Ordering::Relaxed);
                    status.state = JobState::Succeeded;
                    status.step = status.total;
                    let urls: Vec<String> = (0..images.len())
                        .map(|i| format!("/v1/jobs/{}/images/{i}", job.id))
                        .collect();
                    status.images = images;
                    (
                        JobState::Succeeded,
                        json!({"state": "succeeded", "images": urls}),
                    )
                }
                Outcome::Failed(failure) => {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    status.state = JobState::Failed;
                    let event = json!({"state": "failed", "error": {"message": failure.message, "code": failure.code}});
                    status.failure = Some(failure);
                    (JobState::Failed, event)
                }
                Outcome::Cancelled => {
                    self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
                    status.state = JobState::Cancelled;
                    (JobState::Cancelled, json!({"state": "cancelled"}))
                }
            }
        };
        job.emit(state.name(), event);
        // send_replace: the value must stick even when nobody waits yet (send would drop it).
        job.done.send_replace(true);
        inner.finished.push_back(job.id.clone());
        while inner.finished.len() > self.keep_finished {
            if let Some(old) = inner.finished.pop_front() {
                inner.jobs.remove(&old);
            }
        }
    }
}

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    Succeeded(Vec<JobImage>),
    Failed(JobFailure),
    Cancelled,
}
