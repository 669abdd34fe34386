//! Load test of the server on loopback with the tiny fixture pipeline (in this process, ndarray):
//! N requests from C concurrent clients, a share of them cancelled mid-way, in rounds; prints
//! what was answered, latencies, and the process's resident memory after each round.
//!
//!     cargo run --release -p zimage-server --example load_test -- [requests] [clients] [rounds] [backoff ms]
//!
//! Every request must be answered (200, 202 then cancelled, or 429), no job may be
//! lost or answered twice; it exits non-zero otherwise.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{start, Client};
use zimage_server::{Limits, ServerConfig};

fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let requests = args.first().copied().unwrap_or(300);
    let clients = args.get(1).copied().unwrap_or(16);
    let rounds = args.get(2).copied().unwrap_or(3);
    let backoff_ms = args.get(3).copied().unwrap_or(200) as u64;
    let max_queue = 8;
    let server = start(ServerConfig {
        limits: Limits {
            max_queue,
            ..Limits::default()
        },
        ..support::config()
    });
    let address = server.address;
    println!(
        "load test: {requests} requests x {rounds} rounds from {clients} clients, queue {max_queue}, tiny model 32x32, 2 steps; every 10th job is cancelled by a second client, {backoff_ms} ms back-off after a 429"
    );
    println!("start: resident {:.1} MiB", resident_mib());
    let mut failed = false;
    for round in 1..=rounds {
        let next = AtomicUsize::new(0);
        let latencies = Mutex::new(Vec::new());
        let statuses = Mutex::new(Vec::new());
        let jobs = Mutex::new(Vec::new());
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..clients {
                scope.spawn(|| {
                    let client = Client::new(address);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= requests {
                            break;
                        }
                        let t = Instant::now();
                        if i % 10 == 9 {
                            // A job submitted and cancelled while it waits or runs.
                            let reply = client.post_json(
                                "/v1/jobs",
                                &json!({"prompt": format!("request {i}"), "width": 32, "height": 32, "steps": 2, "seed": i}),
                            );
                            if reply.status == 202 {
                                let id = reply.json()["id"].as_str().unwrap().to_string();
                                let cancelled = client.delete(&format!("/v1/jobs/{id}"));
                                statuses.lock().unwrap().push(cancelled.status);
                                jobs.lock().unwrap().push(id);
                            } else {
                                statuses.lock().unwrap().push(reply.status);
                            }
                        } else {
                            let reply = client.post_json(
                                "/v1/images/generations",
                                &json!({"prompt": format!("request {i}"), "size": "32x32", "steps": 2, "seed": i}),
                            );
                            if reply.status == 200 {
                                jobs.lock().unwrap().push(reply.json()["zimage"]["job"].as_str().unwrap().to_string());
                            }
                            statuses.lock().unwrap().push(reply.status);
                        }
                        latencies.lock().unwrap().push(t.elapsed());
                        // A polite client: after a 429 it waits before its next request.
                        if statuses.lock().unwrap().last() == Some(&429) {
                            std::thread::sleep(Duration::from_millis(backoff_ms));
                        }
                    }
                });
            }
        });
        let wall = started.elapsed();
        let statuses = statuses.into_inner().unwrap();
        let mut latencies = latencies.into_inner().unwrap();
        latencies.sort();
        let jobs = jobs.into_inner().unwrap();
        let unique: HashSet<&String> = jobs.iter().collect();
        let count = |s: u16| statuses.iter().filter(|&&x| x == s).count();
        let (ok, accepted, busy) = (count(200), count(202), count(429));
        let other = statuses.len() - ok - accepted - busy;
        let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
        // Let the cancelled ones settle, then compare with the server's own counts.
        std::thread::sleep(Duration::from_millis(300));
        let (waiting, running) = server.shared.queue.depth();
        let c = &server.shared.queue.counters;
        let submitted = c.submitted.load(Ordering::Relaxed);
        let finished = c.succeeded.load(Ordering::Relaxed)
            + c.failed.load(Ordering::Relaxed)
            + c.cancelled.load(Ordering::Relaxed);
        println!(
            "round {round}: {} answered in {:.1} s ({:.1}/s): {ok} images, {accepted} cancelled after 202, {busy} refused (429), {other} other; latency p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms; queue now {waiting} waiting, {} running; server: {submitted} submitted, {finished} finished in all; resident {:.1} MiB",
            statuses.len(),
            wall.as_secs_f64(),
            statuses.len() as f64 / wall.as_secs_f64(),
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.95).as_secs_f64() * 1e3,
            latencies.last().unwrap().as_secs_f64() * 1e3,
            running as u8,
            resident_mib()
        );
        if statuses.len() != requests
            || other != 0
            || unique.len() != jobs.len()
            || submitted != finished
            || waiting != 0
        {
            println!("FAILED: an answer is missing, a job was answered twice, or a job was lost");
            failed = true;
        }
    }
    drop(server);
    if failed {
        std::process::exit(1);
    }
}
