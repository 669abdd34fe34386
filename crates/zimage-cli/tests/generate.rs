//! `zimage generate` end to end on ndarray: every recorded diffusers case from the seed alone,
//! and a one-line error for every kind of bad argument.

use zimage_test_support as common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixtures;
use common::pipeline::{cases, load_png, model_folder, psnr, MIN_PSNR_DB};

fn zimage(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zimage"))
        .args(args)
        .output()
        .expect("run zimage")
}

use common::scratch;

/// The command line equivalent to a recorded diffusers call.
fn arguments(args: &serde_json::Value, model: &Path, output: &Path) -> Vec<String> {
    let mut out = vec![
        "generate".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--backend".into(),
        "ndarray".into(),
        "--quiet".into(),
        "--output".into(),
        output.display().to_string(),
    ];
    let prompts: Vec<&str> = match &args["prompt"] {
        serde_json::Value::String(s) => vec![s.as_str()],
        serde_json::Value::Array(v) => v.iter().filter_map(|p| p.as_str()).collect(),
        other => panic!("prompt {other}"),
    };
    for p in prompts {
        out.extend(["--prompt".into(), p.into()]);
    }
    let flag = |name: &str, key: &str, out: &mut Vec<String>| {
        if let Some(v) = args.get(key).filter(|v| !v.is_null()) {
            let text = v
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            out.extend([name.to_string(), text]);
        }
    };
    flag("--negative-prompt", "negative_prompt", &mut out);
    flag("--width", "width", &mut out);
    flag("--height", "height", &mut out);
    flag("--steps", "num_inference_steps", &mut out);
    flag("--guidance", "guidance_scale", &mut out);
    flag("--cfg-normalization", "cfg_normalization", &mut out);
    flag("--cfg-truncation", "cfg_truncation", &mut out);
    flag("--num-images", "num_images_per_prompt", &mut out);
    flag("--seed", "seed", &mut out);
    flag("--strength", "strength", &mut out);
    for key in ["image", "mask"] {
        if let Some(file) = args[key].as_str() {
            out.extend([
                format!("--{key}"),
                fixtures().join("pipeline").join(file).display().to_string(),
            ]);
        }
    }
    out
}

#[test]
fn reproduces_every_diffusers_case_from_the_seed() {
    let model = model_folder();
    let dir = scratch("cases");
    for case in cases() {
        let output = dir.join(format!("{}.png", case.name));
        let args = arguments(&case.args, &model, &output);
        let run = Command::new(env!("CARGO_BIN_EXE_zimage"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}: {}",
            case.name,
            String::from_utf8_lossy(&run.stderr)
        );
        let written: Vec<PathBuf> = String::from_utf8_lossy(&run.stdout)
            .lines()
            .map(PathBuf::from)
            .collect();
        assert_eq!(written.len(), case.expected.len(), "{}", case.name);
        for (path, expected) in written.iter().zip(&case.expected) {
            let db = psnr(
                &load_png(path),
                &load_png(&fixtures().join("pipeline").join(expected)),
            );
            println!("zimage generate {:<26} PSNR {db:.1} dB", case.name);
            assert!(db >= MIN_PSNR_DB, "{}: {db:.1} dB", case.name);
        }
    }
    // The parameters travel in the PNG.
    let first = std::fs::read(dir.join("t2i_turbo.png")).unwrap();
    let text = String::from_utf8_lossy(&first);
    assert!(
        text.contains("\"seed\":42") && text.contains("hello world"),
        "PNG text chunk"
    );
}

/// The command fails with exactly one line on stderr containing `needle`, and writes nothing.
fn refused(args: &[&str], needle: &str) {
    refused_in("refused", args, needle)
}

/// [`refused`] with its own scratch folder (tests run in parallel; one folder each).
fn refused_in(folder: &str, args: &[&str], needle: &str) {
    let dir = scratch(folder);
    let output = dir.join("out.png");
    let mut all: Vec<&str> = args.to_vec();
    let output_arg = output.display().to_string();
    all.extend(["--output", &output_arg]);
    let run = zimage(&all);
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{args:?} -> {stderr}");
    assert!(!run.status.success(), "{args:?} succeeded");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{args:?}: not one line: {stderr}"
    );
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        std::fs::read_dir(&dir).unwrap().next().is_none(),
        "{args:?} left a file behind"
    );
}

#[test]
fn bad_arguments_get_one_line() {
    let model = model_folder();
    let m = model.display().to_string();
    let image = fixtures()
        .join("pipeline/inputs/image.png")
        .display()
        .to_string();
    let mask = fixtures()
        .join("pipeline/inputs/mask.png")
        .display()
        .to_string();
    let base = [
        "generate",
        "--backend",
        "ndarray",
        "--model",
        m.as_str(),
        "-p",
        "a cat",
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let run = |extra: &[&'static str], needle: &str| {
        let args = with(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&refs, needle);
    };
    run(&["--width", "100"], "multiple of 16");
    run(&["--height", "0"], "multiple of 16");
    run(&["--steps", "0"], "--steps");
    let image_args = |s: &'static str| -> Vec<String> {
        vec![
            "--image".into(),
            image.clone(),
            "--strength".into(),
            s.into(),
        ]
    };
    for bad in ["0", "1.5", "-0.2"] {
        let args: Vec<String> = with(&[]).into_iter().chain(image_args(bad)).collect();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&refs, "strength");
    }
    let args: Vec<String> = with(&["--mask"])
        .into_iter()
        .chain([mask.clone()])
        .collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    refused(&refs, "--mask needs --image");
    refused(
        &["generate", "--backend", "tpu", "--model", &m, "-p", "x"],
        "tpu",
    );
    refused(
        &[
            "generate",
            "--backend",
            "ndarray",
            "--dtype",
            "bf16",
            "--model",
            &m,
            "-p",
            "x",
        ],
        "bf16",
    );
    refused(
        &[
            "generate",
            "--backend",
            "ndarray",
            "--model",
            "/nonexistent/model",
            "-p",
            "x",
        ],
        "/nonexistent/model",
    );
    // A model folder missing a part.
    let broken = scratch("broken");
    for entry in ["model_index.json", "scheduler"] {
        let from = model.join(entry);
        if from.is_dir() {
            std::fs::create_dir_all(broken.join(entry)).unwrap();
            for f in std::fs::read_dir(&from).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), broken.join(entry).join(f.file_name())).unwrap();
            }
        } else {
            std::fs::copy(&from, broken.join(entry)).unwrap();
        }
    }
    let b = broken.display().to_string();
    refused(
        &["generate", "--backend", "ndarray", "--model", &b, "-p", "x"],
        "transformer/config.json is missing",
    );
    refused(
        &["generate", "--model", &m, "-p", "x", "--output-format"],
        "--output-format",
    );
    // A folder that does not exist for the output: nothing partial is left.
    let run = zimage(&[
        "generate",
        "--backend",
        "ndarray",
        "--model",
        &m,
        "-p",
        "x",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "1",
        "-q",
        "--output",
        "/nonexistent/dir/out.png",
    ]);
    assert!(!run.status.success());
    assert_eq!(
        String::from_utf8_lossy(&run.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
}

/// A pass that fails ends `zimage bench` with its error instead of being timed as a fast pass.
#[test]
fn bench_reports_a_failing_pass() {
    let run = zimage(&[
        "bench",
        "--backend",
        "ndarray",
        "--shapes",
        "tiny",
        "--only",
        "dit",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--sizes",
        "24",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(!run.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("multiple of the patch size"), "{stderr}");
    assert!(
        !stdout.contains("median"),
        "a failed pass was timed: {stdout}"
    );
    // The same bench at a valid size times it.
    let run = zimage(&[
        "bench",
        "--backend",
        "ndarray",
        "--shapes",
        "tiny",
        "--only",
        "dit",
        "--runs",
        "1",
        "--warmup",
        "0",
        "--sizes",
        "32",
    ]);
    assert!(run.status.success() && String::from_utf8_lossy(&run.stdout).contains("median"));
}

/// Two adapters at their scales (`--lora FILE:SCALE`, repeated) give diffusers' image of
/// `pipe.load_lora_weights` with `set_adapters(..., [0.7, -0.5])`.
#[test]
fn loras_on_the_command_line_make_diffusers_images() {
    let dir = fixtures().join("lora");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let case = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "peft_0.7_kohya_-0.5")
        .expect("the two-adapter case");
    let output = scratch("cli-lora").join("two.png");
    let mut args = arguments(&case["args"], &model_folder(), &output);
    for adapter in case["adapters"].as_array().unwrap() {
        args.push("--lora".into());
        args.push(format!(
            "{}:{}",
            dir.join(adapter["file"].as_str().unwrap()).display(),
            adapter["scale"]
        ));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = zimage(&args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let expected = load_png(&dir.join(case["expected"][0].as_str().unwrap()));
    let db = psnr(&load_png(&output), &expected);
    println!("--lora peft:0.7 --lora kohya:-0.5: PSNR {db:.1} dB");
    assert!(db >= MIN_PSNR_DB, "PSNR {db:.1} dB");
}

#[test]
fn bad_adapters_get_one_line() {
    let m = model_folder().display().to_string();
    let dir = fixtures().join("lora");
    let not_a_lora = dir.join("not_a_lora.safetensors").display().to_string();
    let base = [
        "generate", "--model", &m, "-p", "x", "--width", "64", "--height", "64",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    for (extra, needle) in [
        (vec!["--lora", not_a_lora.as_str()], "is not a LoRA"),
        (
            vec!["--lora", "/nonexistent/a.safetensors:0.5"],
            "/nonexistent/a.safetensors",
        ),
        (vec!["--lora", ":0.5"], "no file before the scale"),
        (vec!["--shift", "0"], "--shift 0 is not a positive number"),
    ] {
        let args = with(&extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused_in("refused-lora", &args, needle);
    }
}

#[test]
fn controlnets_on_the_command_line_make_diffusers_images() {
    let dir = fixtures().join("controlnet");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let out = scratch("cli-controlnet");
    for name in ["t2i_v2_1_scale", "inpaint_v2_1_scale_guidance", "t2i_v1"] {
        let case = cases["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .expect("the case");
        let output = out.join(format!("{name}.png"));
        let mut args = arguments(&case["args"], &model_folder(), &output);
        args.extend([
            "--controlnet".into(),
            dir.join(format!(
                "{}.safetensors",
                case["controlnet"].as_str().unwrap()
            ))
            .display()
            .to_string(),
            "--control-image".into(),
            dir.join(case["args"]["control_image"].as_str().unwrap())
                .display()
                .to_string(),
        ]);
        if let Some(scale) = case["args"].get("controlnet_conditioning_scale") {
            args.extend(["--control-scale".into(), scale.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = zimage(&args);
        assert!(
            run.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let db = psnr(
            &load_png(&output),
            &load_png(&dir.join(case["expected"][0].as_str().unwrap())),
        );
        println!("--controlnet {name}: PSNR {db:.1} dB");
        assert!(db >= MIN_PSNR_DB, "{name}: PSNR {db:.1} dB");
        let text = String::from_utf8_lossy(&std::fs::read(&output).unwrap()).into_owned();
        assert!(
            text.contains("\"controlnet\":{"),
            "the PNG records the ControlNet"
        );
    }
}

#[test]
fn bad_controlnet_arguments_get_one_line() {
    let m = model_folder().display().to_string();
    let dir = fixtures().join("controlnet");
    let control = dir.join("inputs/control.png").display().to_string();
    let v2 = dir.join("v2_1.safetensors").display().to_string();
    let v1 = dir.join("v1.safetensors").display().to_string();
    let image = fixtures()
        .join("pipeline/inputs/image.png")
        .display()
        .to_string();
    let mask = fixtures()
        .join("pipeline/inputs/mask.png")
        .display()
        .to_string();
    let transformer = fixtures()
        .join("pipeline/tiny/transformer/diffusion_pytorch_model-00001-of-00003.safetensors");
    let transformer = transformer.display().to_string();
    let base = [
        "generate",
        "--model",
        &m,
        "--backend",
        "ndarray",
        "--quiet",
        "-p",
        "a cat",
        "--steps",
        "1",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            with(&["--controlnet", &v2]),
            "--controlnet needs --control-image",
        ),
        (
            with(&["--control-image", &control]),
            "--control-image needs --controlnet",
        ),
        (
            with(&[
                "--controlnet",
                &v2,
                "--control-image",
                &control,
                "--image",
                &image,
            ]),
            "needs --mask",
        ),
        (
            with(&[
                "--controlnet",
                &v2,
                "--control-image",
                &control,
                "--image",
                &image,
                "--mask",
                &mask,
                "--strength",
                "0.5",
            ]),
            "--strength does not apply",
        ),
        (with(&["--canny"]), "--canny applies to --control-image"),
        (
            with(&[
                "--controlnet",
                &v2,
                "--control-image",
                &control,
                "--canny",
                "200,100",
            ]),
            "LOW,HIGH",
        ),
        (
            with(&["--controlnet", &transformer, "--control-image", &control]),
            "ControlNet",
        ),
        (
            with(&[
                "--controlnet",
                &v1,
                "--control-image",
                &control,
                "--image",
                &image,
                "--mask",
                &mask,
            ]),
            "inpaint",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused_in("refused-controlnet", &args, needle);
    }
}
