//! `zimage generate` with weights from a (local, fake) Hub: the same picture as from the folder,
//! online and then offline. (Single files: `model_files.rs`.)

use zimage_test_support as common;
use zimage_test_support::fake_hub as hub;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::fixtures;
use common::pipeline::{load_png, model_folder, psnr, MIN_PSNR_DB};

use common::scratch;

/// The t2i_turbo case's arguments.
fn generate(
    model: &str,
    extra: &[&str],
    output: &Path,
    envs: &[(&str, &Path)],
    hub: Option<&str>,
) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zimage"));
    cmd.args(["generate", "--backend", "ndarray", "-q", "--model", model])
        .args([
            "-p",
            "a cat holding a sign that says hello world",
            "--width",
            "64",
            "--height",
            "64",
        ])
        .args(["--steps", "8", "--seed", "42", "--output"])
        .arg(output)
        .args(extra);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    if let Some(url) = hub {
        cmd.env("HF_ENDPOINT", url);
    }
    cmd.env_remove("HF_TOKEN").output().unwrap()
}

fn expected() -> image::RgbImage {
    load_png(&fixtures().join("pipeline/expected/t2i_turbo.png"))
}

fn all_files(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all_files(root, &path, out);
        } else {
            let name = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            out.insert(name, std::fs::read(&path).unwrap());
        }
    }
}

#[test]
fn downloads_from_the_hub_then_works_offline() {
    let hub = hub::FakeHub::start();
    let mut files = BTreeMap::new();
    let folder = model_folder();
    all_files(&folder, &folder, &mut files);
    hub.add_repo("tiny-org/Z-Image-Tiny", files);
    let home = scratch("hf-home");
    let dir = scratch("hub-out");

    let out = dir.join("hub.png");
    let run = generate(
        "tiny-org/Z-Image-Tiny",
        &[],
        &out,
        &[("HF_HOME", &home)],
        Some(&hub.url),
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let db = psnr(&load_png(&out), &expected());
    println!("from the Hub: PSNR {db:.1} dB");
    assert!(db >= MIN_PSNR_DB);
    assert!(home
        .join("hub/models--tiny-org--Z-Image-Tiny/snapshots")
        .is_dir());

    // Offline, from the cache alone (the endpoint points nowhere).
    let out = dir.join("offline.png");
    let run = Command::new(env!("CARGO_BIN_EXE_zimage"))
        .args([
            "generate",
            "--backend",
            "ndarray",
            "-q",
            "--model",
            "tiny-org/Z-Image-Tiny",
            "-p",
            "a cat holding a sign that says hello world",
        ])
        .args([
            "--width", "64", "--height", "64", "--steps", "8", "--seed", "42", "--output",
        ])
        .arg(&out)
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(psnr(&load_png(&out), &expected()) >= MIN_PSNR_DB);

    // A repo that does not exist: one line naming it.
    let run = generate(
        "tiny-org/Nothing-Here",
        &[],
        &dir.join("none.png"),
        &[("HF_HOME", &home)],
        Some(&hub.url),
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("tiny-org/Nothing-Here"), "{stderr}");
}
