//! `zimage generate` with weights from a (local, fake) Hub and from single files: the same
//! picture as from the folder.

#[path = "../../../tests/tests/common/mod.rs"]
mod common;
#[path = "../../zimage-hub/tests/common/mod.rs"]
#[allow(dead_code)]
mod hub;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::fixtures;
use common::pipeline::{load_png, model_folder, psnr};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zimage-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

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
    assert!(db >= 40.0);
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
    assert!(psnr(&load_png(&out), &expected()) >= 40.0);

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

#[test]
fn single_file_weights_replace_a_component() {
    // The transformer of the tiny pipeline in original/ComfyUI naming, written by the test.
    let folder = model_folder();
    let dir = scratch("single");
    let source = zimage_nn::Checkpoint::open(folder.join("transformer")).unwrap();
    let mut tensors: Vec<(String, burn::tensor::TensorData)> = Vec::new();
    let mut qkv: BTreeMap<String, Vec<Vec<f32>>> = BTreeMap::new();
    for (name, _) in source.entries() {
        let data = source.read(name, None, burn::tensor::DType::F32).unwrap();
        for part in ["to_q", "to_k", "to_v"] {
            if let Some(block) = name.strip_suffix(&format!(".attention.{part}.weight")) {
                qkv.entry(block.to_string())
                    .or_default()
                    .push(data.to_vec::<f32>().unwrap());
            }
        }
        if name.contains(".attention.to_q.")
            || name.contains(".attention.to_k.")
            || name.contains(".attention.to_v.")
        {
            continue;
        }
        let renamed = name
            .replace(".attention.to_out.0.", ".attention.out.")
            .replace(".attention.norm_q.", ".attention.q_norm.")
            .replace(".attention.norm_k.", ".attention.k_norm.")
            .replace("all_final_layer.2-1.", "final_layer.")
            .replace("all_x_embedder.2-1.", "x_embedder.");
        tensors.push((format!("model.diffusion_model.{renamed}"), data));
    }
    for (block, parts) in qkv {
        let rows = parts[0].len() / 32;
        let fused: Vec<f32> = parts.concat();
        tensors.push((
            format!("model.diffusion_model.{block}.attention.qkv.weight"),
            burn::tensor::TensorData::new(fused, [3 * rows, 32]),
        ));
    }
    let file = dir.join("z_image_tiny_original.safetensors");
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d)| {
            let shape: Vec<usize> = d.shape.to_vec();
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, d.as_bytes())
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &file).unwrap();

    let out = dir.join("single.png");
    let file_arg = file.display().to_string();
    let run = generate(
        &folder.display().to_string(),
        &["--transformer", &file_arg],
        &out,
        &[],
        None,
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let db = psnr(&load_png(&out), &expected());
    println!("original-format transformer file: PSNR {db:.1} dB");
    assert!(db >= 40.0);

    let run = generate(
        &folder.display().to_string(),
        &["--vae", "/nonexistent/ae.safetensors"],
        &dir.join("x.png"),
        &[],
        None,
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && stderr.contains("/nonexistent/ae.safetensors"),
        "{stderr}"
    );
}
