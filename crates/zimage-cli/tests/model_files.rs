//! `zimage generate` from single files: each one replacing its folder's (different) weights, the
//! three files as a model by themselves, ComfyUI's Hub layout, the variant choice, and the
//! memory refusal.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use zimage_test_support::fake_hub::FakeHub;
use zimage_test_support::pipeline::{copy_dir, load_png, model_folder, psnr, MIN_PSNR_DB};
use zimage_test_support::{
    comfy_transformer, fixtures, read_checkpoint, scratch, write_safetensors, NamedTensor,
};

/// The t2i_turbo case (64x64, 8 steps, seed 42) with `args` before it.
fn generate(args: &[&str], output: &Path, envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zimage"));
    cmd.arg("generate")
        .args(args)
        .args([
            "--backend",
            "ndarray",
            "-p",
            "a cat holding a sign that says hello world",
        ])
        .args([
            "--width", "64", "--height", "64", "--steps", "8", "--seed", "42",
        ])
        .arg("--output")
        .arg(output)
        .env_remove("HF_TOKEN")
        // No network: a Hub request would fail at once.
        .env("HF_ENDPOINT", "http://127.0.0.1:9");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run zimage")
}

fn expected() -> image::RgbImage {
    load_png(&fixtures().join("pipeline/expected/t2i_turbo.png"))
}

fn stderr(run: &Output) -> String {
    String::from_utf8_lossy(&run.stderr).into_owned()
}

/// The psnr of the run's image against diffusers', after checking it succeeded.
fn image_psnr(run: &Output, output: &Path) -> f64 {
    assert!(run.status.success(), "{}", stderr(run));
    psnr(&load_png(output), &expected())
}

/// The tiny pipeline's three components as single files: the transformer in ComfyUI naming, the
/// text encoder without the `model.` prefix, the VAE as diffusers saves it; each with its config
/// in the safetensors metadata when `embed_configs`.
fn single_files(dir: &Path, embed_configs: bool) -> [PathBuf; 3] {
    let folder = model_folder();
    let config = |component: &str| {
        embed_configs.then(|| {
            let json = std::fs::read_to_string(folder.join(component).join("config.json")).unwrap();
            HashMap::from([("config".to_string(), json)])
        })
    };
    let transformer = dir.join("z_image_tiny_turbo_bf16.safetensors");
    write_safetensors(
        &transformer,
        &comfy_transformer(
            &zimage_transformer::ZImageTransformerConfig::from_file(
                folder.join("transformer/config.json"),
            )
            .unwrap(),
            &read_checkpoint(&folder.join("transformer")),
        ),
        config("transformer"),
    );
    let text_encoder = dir.join("qwen_3_tiny.safetensors");
    let bare: Vec<NamedTensor> = read_checkpoint(&folder.join("text_encoder"))
        .into_iter()
        .map(|(n, v, s)| (n.trim_start_matches("model.").to_string(), v, s))
        .collect();
    write_safetensors(&text_encoder, &bare, config("text_encoder"));
    let vae = dir.join("ae.safetensors");
    write_safetensors(&vae, &read_checkpoint(&folder.join("vae")), config("vae"));
    [transformer, text_encoder, vae]
}

/// A copy of the tiny model folder whose `component` weights are all zero.
fn decoy_folder(dir: &Path, component: &str) -> PathBuf {
    let folder = dir.join(format!("decoy-{component}"));
    copy_dir(&model_folder(), &folder);
    let weights = folder.join(component);
    let zeroed: Vec<NamedTensor> = read_checkpoint(&weights)
        .into_iter()
        .map(|(n, v, s)| (n, vec![0.0; v.len()], s))
        .collect();
    for entry in std::fs::read_dir(&weights).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.contains(".safetensors") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let stem = if component == "text_encoder" {
        "model"
    } else {
        "diffusion_pytorch_model"
    };
    write_safetensors(&weights.join(format!("{stem}.safetensors")), &zeroed, None);
    folder
}

#[test]
fn each_single_file_replaces_its_folders_weights() {
    let dir = scratch("replace");
    let files = single_files(&dir, false);
    for (component, flag, file) in [
        ("transformer", "--transformer", &files[0]),
        ("text_encoder", "--text-encoder", &files[1]),
        ("vae", "--vae", &files[2]),
    ] {
        let decoy = decoy_folder(&dir, component);
        let decoy_arg = decoy.display().to_string();
        // The folder alone draws something else: the test can tell the file was used.
        let out = dir.join(format!("{component}-decoy.png"));
        let db = image_psnr(&generate(&["--model", &decoy_arg, "-q"], &out, &[]), &out);
        assert!(db < 30.0, "{component}: zeroed weights gave {db:.1} dB");
        let out = dir.join(format!("{component}.png"));
        let file_arg = file.display().to_string();
        let run = generate(&["--model", &decoy_arg, flag, &file_arg, "-q"], &out, &[]);
        let db = image_psnr(&run, &out);
        println!("{flag} over zeroed folder weights: PSNR {db:.1} dB");
        assert!(db >= MIN_PSNR_DB, "{flag}: PSNR {db:.1} dB");
    }
    // A missing file is named, before anything loads.
    let run = generate(
        &[
            "--model",
            &model_folder().display().to_string(),
            "--vae",
            "/nonexistent/ae.safetensors",
        ],
        &dir.join("x.png"),
        &[],
    );
    assert!(
        !run.status.success() && stderr(&run).contains("/nonexistent/ae.safetensors"),
        "{}",
        stderr(&run)
    );
}

#[test]
fn three_single_files_are_a_model() {
    let dir = scratch("three");
    let [transformer, text_encoder, vae] = single_files(&dir, true);
    let args = |t: &Path, te: &Path, v: &Path| {
        [
            "--transformer".to_string(),
            t.display().to_string(),
            "--text-encoder".into(),
            te.display().to_string(),
            "--vae".into(),
            v.display().to_string(),
        ]
    };
    // No --model, no folder, no network: configs from the files, the built-in tokenizer.
    let out = dir.join("three.png");
    let a = args(&transformer, &text_encoder, &vae);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let run = generate(&a, &out, &[("HF_HUB_OFFLINE", "1")]);
    let db = image_psnr(&run, &out);
    println!("three single files: PSNR {db:.1} dB\n{}", stderr(&run));
    assert!(db >= MIN_PSNR_DB, "PSNR {db:.1} dB");
    assert!(stderr(&run).contains("Z-Image turbo"), "{}", stderr(&run));

    // Without a config in the file, the published shapes are expected: tiny files are refused
    // with an error naming the first stage's file (the text encoder), not a panic.
    let bare = dir.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    let [t, te, v] = single_files(&bare, false);
    let a = args(&t, &te, &v);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let run = generate(&a, &bare.join("x.png"), &[]);
    let text = stderr(&run);
    assert!(!run.status.success(), "{text}");
    assert!(
        text.contains("not the published Qwen3-4B") && text.contains(&te.display().to_string()),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn comfyui_layout_on_the_hub_downloads_three_files() {
    let dir = scratch("comfy-hub");
    let files = single_files(&dir, true);
    let hub = FakeHub::start();
    let mut repo = BTreeMap::new();
    for (folder, file) in [
        ("diffusion_models", &files[0]),
        ("text_encoders", &files[1]),
        ("vae", &files[2]),
    ] {
        let name = file.file_name().unwrap().to_string_lossy();
        repo.insert(
            format!("split_files/{folder}/{name}"),
            std::fs::read(file).unwrap(),
        );
    }
    repo.insert("README.md".into(), b"ComfyUI repack".to_vec());
    hub.add_repo("tiny-org/z_image_tiny", repo);
    let home = dir.join("hf-home");
    let out = dir.join("comfy.png");
    let run = generate(
        &["--model", "tiny-org/z_image_tiny", "-q"],
        &out,
        &[
            ("HF_HOME", home.to_str().unwrap()),
            ("HF_ENDPOINT", &hub.url),
        ],
    );
    let db = image_psnr(&run, &out);
    println!("ComfyUI layout from the Hub: PSNR {db:.1} dB");
    assert!(db >= MIN_PSNR_DB);
    let downloads = hub
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.starts_with("/cdn/"))
        .count();
    assert_eq!(downloads, 3);
}

/// A folder as diffusers' `save_pretrained` writes it from Turbo: `siglip_feat_dim: null` in the
/// transformer config, written by 0.42.1.
fn resaved_folder(dir: &Path, shift: f64, name: &str) -> PathBuf {
    let folder = dir.join(name);
    copy_dir(&model_folder(), &folder);
    let path = folder.join("transformer/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["siglip_feat_dim"] = serde_json::Value::Null;
    config["_diffusers_version"] = "0.42.1".into();
    std::fs::write(&path, config.to_string()).unwrap();
    let path = folder.join("scheduler/scheduler_config.json");
    let mut scheduler: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    scheduler["shift"] = shift.into();
    std::fs::write(&path, scheduler.to_string()).unwrap();
    folder
}

#[test]
fn turbo_or_base_is_chosen_right() {
    use zimage_pipeline::{ModelFiles, Variant};
    let dir = scratch("variant");
    let turbo = resaved_folder(&dir, 3.0, "resaved-model");
    assert_eq!(ModelFiles::open(&turbo).unwrap().variant(), Variant::Turbo);
    let base = resaved_folder(&dir, 6.0, "resaved-base");
    assert_eq!(ModelFiles::open(&base).unwrap().variant(), Variant::Base);
    // The published configs: Turbo's has no siglip_feat_dim, the base model's names it.
    assert_eq!(
        ModelFiles::open(model_folder()).unwrap().variant(),
        Variant::Turbo
    );

    // The command says which, and --variant overrides it (base: 50 steps and guidance 4).
    let out = dir.join("turbo.png");
    let run = Command::new(env!("CARGO_BIN_EXE_zimage"))
        .args(["generate", "--backend", "ndarray", "--model"])
        .arg(&turbo)
        .args([
            "-p",
            "a cat holding a sign that says hello world",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "42",
            "--output",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let text = stderr(&run);
    assert!(run.status.success(), "{text}");
    assert!(
        text.contains("Z-Image turbo") && text.contains("8 steps, guidance 0"),
        "{text}"
    );
    assert!(psnr(&load_png(&out), &expected()) >= MIN_PSNR_DB);
    let run = Command::new(env!("CARGO_BIN_EXE_zimage"))
        .args([
            "generate",
            "--backend",
            "ndarray",
            "--variant",
            "base",
            "--steps",
            "1",
            "--model",
        ])
        .arg(&turbo)
        .args(["-p", "x", "--width", "32", "--height", "32", "--output"])
        .arg(dir.join("base.png"))
        .output()
        .unwrap();
    let text = stderr(&run);
    assert!(run.status.success(), "{text}");
    assert!(
        text.contains("Z-Image base (as asked)") && text.contains("guidance 4"),
        "{text}"
    );
}

#[test]
fn sizes_that_cannot_fit_are_refused_before_anything_loads() {
    let dir = scratch("refuse");
    let folder = model_folder().display().to_string();
    // Beyond the model's position table: a clear error, never an allocation abort.
    let run = Command::new(env!("CARGO_BIN_EXE_zimage"))
        .args([
            "generate",
            "--backend",
            "ndarray",
            "-q",
            "--model",
            &folder,
            "-p",
            "x",
        ])
        .args(["--width", "65536", "--height", "65536", "--output"])
        .arg(dir.join("huge.png"))
        .output()
        .unwrap();
    let text = stderr(&run);
    assert!(!run.status.success(), "{text}");
    assert!(
        text.contains("65536") && !text.contains("panicked") && !text.contains("memory allocation"),
        "{text}"
    );
    assert_eq!(text.trim_end().lines().count(), 1, "{text}");

    // Within it but beyond this machine's memory: the estimate refuses, naming the ways out.
    let run = Command::new(env!("CARGO_BIN_EXE_zimage"))
        .args([
            "generate",
            "--backend",
            "ndarray",
            "-q",
            "--model",
            &folder,
            "-p",
            "x",
        ])
        .args(["--width", "1024", "--height", "1024", "--output"])
        .arg(dir.join("big.png"))
        .env("ZIMAGE_AVAILABLE_MEMORY", "1M")
        .output()
        .unwrap();
    let text = stderr(&run);
    assert!(!run.status.success(), "{text}");
    assert!(
        text.contains("needs about") && text.contains("--vae-tile") && text.contains("--force"),
        "{text}"
    );
    assert!(!dir.join("big-0.png").exists() && !dir.join("big.png").exists());
}

#[test]
fn f32_weights_that_do_not_fit_are_held_in_bf16() {
    use burn::tensor::DType;
    use zimage_nn::Precision;
    use zimage_pipeline::{ModelFiles, ZImagePipeline};
    use zimage_test_support::B;

    let dir = scratch("fallback");
    // The tiny folder with every component stored in f32 (its text encoder is bf16, as the
    // published one: widened here, exactly), like Tongyi-MAI/Z-Image-Turbo's f32 transformer.
    let folder = dir.join("f32-model");
    copy_dir(&model_folder(), &folder);
    let weights = folder.join("text_encoder");
    let tensors = read_checkpoint(&weights);
    for entry in std::fs::read_dir(&weights).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains(".safetensors")
        {
            std::fs::remove_file(path).unwrap();
        }
    }
    write_safetensors(&weights.join("model.safetensors"), &tensors, None);
    // Estimate the t2i_turbo run as stored and in bf16, and pretend the machine has memory for
    // the second only.
    let device = Default::default();
    let files = ModelFiles::open(&folder).unwrap();
    let pipeline = ZImagePipeline::<B>::new(files, &device, DType::F32).unwrap();
    let mut options = pipeline.options("a cat holding a sign that says hello world");
    (options.width, options.height) = (64, 64);
    let as_stored = pipeline.estimate_memory(&options).unwrap();
    let pipeline =
        pipeline.with_precision(Precision::from(DType::F32).with_weights(Some(DType::BF16)));
    let narrowed = pipeline.estimate_memory(&options).unwrap();
    assert!(
        narrowed.peak() < as_stored.peak(),
        "{narrowed:?} vs {as_stored:?}"
    );
    let (as_stored, narrowed) = (as_stored.peak(), narrowed.peak());
    let budget = ((as_stored + narrowed) / 2).to_string();
    let folder = folder.display().to_string();
    let env = [("ZIMAGE_AVAILABLE_MEMORY", budget.as_str())];

    // No --weights-dtype: held in bf16, said in one line, and the picture is still diffusers'
    // within bf16's rounding of the weights.
    let out = dir.join("bf16.png");
    let run = generate(&["--model", &folder], &out, &env);
    let text = stderr(&run);
    let db = image_psnr(&run, &out);
    println!("{text}\nbf16 weights: PSNR {db:.1} dB");
    assert!(text.contains("holding the weights in bf16"), "{text}");
    assert!(db >= 30.0, "PSNR {db:.1} dB");

    // --weights-dtype f32 insists: refused with the figures, or run with --force.
    let run = generate(
        &["--model", &folder, "--weights-dtype", "f32"],
        &dir.join("f32.png"),
        &env,
    );
    let text = stderr(&run);
    assert!(
        !run.status.success() && text.contains("needs about") && text.contains("--force"),
        "{text}"
    );
    let out = dir.join("forced.png");
    let run = generate(
        &["--model", &folder, "--weights-dtype", "f32", "--force"],
        &out,
        &env,
    );
    assert!(image_psnr(&run, &out) >= MIN_PSNR_DB, "{}", stderr(&run));
    assert!(stderr(&run).contains("warning (--force)"));

    // A budget that is not a byte count is an error, not ignored.
    let run = generate(
        &["--model", &folder],
        &dir.join("x.png"),
        &[("ZIMAGE_AVAILABLE_MEMORY", "lots")],
    );
    assert!(
        !run.status.success() && stderr(&run).contains("ZIMAGE_AVAILABLE_MEMORY=lots"),
        "{}",
        stderr(&run)
    );
}
