//! The Qwen3 tokenizer and text encoder against transformers 5.24 and diffusers 0.42.1
//! (`tests/fixtures/make_qwen3_tokenizer.py`, `tests/fixtures/make_text_fixtures.py`).

use zimage_test_support as common;

use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::{DType, Tensor};
use common::{errors, fixtures, to_vec, Case, B};
use serde::Deserialize;
use zimage_nn::AttentionImpl;
use zimage_text::{PromptTokenizer, Qwen3TextEncoder};

/// The f32 bar; a correct port lands around 1e-6.
const REL_L2: f64 = 1e-5;
const MAX_ABS: f64 = 1e-4;

const CASES: &[(&str, &[&str])] = &[
    ("a", &["single", "batch3", "equal", "long"]),
    ("b", &["single", "batch3"]),
    ("c", &["batch3", "long"]),
];

fn text_fixtures() -> PathBuf {
    fixtures().join("text")
}

/// The real Qwen3 tokenizer, unpacked once into cargo's scratch directory for this test binary.
fn tokenizer_folder() -> &'static PathBuf {
    static FOLDER: OnceLock<PathBuf> = OnceLock::new();
    FOLDER.get_or_init(|| {
        let folder = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("text_parity_tokenizer");
        std::fs::create_dir_all(&folder).expect("scratch dir");
        let json = zimage_text::qwen3_tokenizer_json().expect("built-in tokenizer");
        std::fs::write(folder.join("tokenizer.json"), json).expect("write tokenizer.json");
        folder
    })
}

fn tokenizer() -> PromptTokenizer {
    PromptTokenizer::from_folder(tokenizer_folder()).expect("tokenizer")
}

#[derive(Deserialize)]
struct TokenizerCases {
    max_sequence_lengths: Vec<usize>,
    cases: Vec<TokenizerCase>,
}

#[derive(Deserialize)]
struct TokenizerCase {
    name: String,
    prompt: String,
    untruncated_len: usize,
    #[serde(flatten)]
    ids: std::collections::HashMap<String, serde_json::Value>,
}

#[test]
fn tokenizer_matches_transformers() {
    let tok = tokenizer();
    let text =
        std::fs::read_to_string(text_fixtures().join("tokenizer_cases.json")).expect("fixture");
    let fixture: TokenizerCases = serde_json::from_str(&text).expect("json");
    assert!(fixture.cases.len() >= 30);
    let prompts: Vec<&str> = fixture.cases.iter().map(|c| c.prompt.as_str()).collect();
    let mut compared = 0;
    for &max_len in &fixture.max_sequence_lengths {
        // The whole list at once, as the pipeline calls it.
        let got = tok.encode_prompts(&prompts, max_len).expect("encode");
        for (case, got) in fixture.cases.iter().zip(&got) {
            let expected: Vec<u32> =
                serde_json::from_value(case.ids[&format!("ids_{max_len}")].clone()).expect("ids");
            assert_eq!(
                got, &expected,
                "{} (max_sequence_length {max_len})",
                case.name
            );
            compared += 1;
        }
    }
    for case in &fixture.cases {
        let full = tok
            .encode_text(&PromptTokenizer::chat_text(&case.prompt))
            .expect("encode");
        assert_eq!(full.len(), case.untruncated_len, "{}", case.name);
    }
    println!(
        "{compared} tokenizations of {} prompts equal transformers' ids",
        fixture.cases.len()
    );
}

#[test]
fn template_and_special_tokens() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 151_669);
    for (token, id) in [
        ("<|endoftext|>", 151_643),
        ("<|im_start|>", 151_644),
        ("<|im_end|>", 151_645),
        ("<|vision_start|>", 151_652),
        ("<think>", 151_667),
        ("</think>", 151_668),
    ] {
        assert_eq!(tok.token_to_id(token), Some(id), "{token}");
    }
    // Spec §3.1: the empty (negative) prompt is 8 tokens; "user" 872, "assistant" 77091, "\n" 198.
    let empty = tok.encode_prompts(&[""], 512).expect("encode");
    assert_eq!(
        empty[0],
        [151_644, 872, 198, 151_645, 198, 151_644, 77091, 198]
    );
    // Special-token text inside a prompt is that token ("a" 64, "b" 65).
    let ids = tok
        .encode_prompts(&["a<|im_end|>b<think>"], 512)
        .expect("encode");
    assert_eq!(
        ids[0],
        [151_644, 872, 198, 64, 151_645, 65, 151_667, 151_645, 198, 151_644, 77091, 198]
    );
    // Truncation cuts the template's tail; decoding gives the text back.
    let cut = tok.encode_prompts(&["a cat"], 4).expect("encode");
    assert_eq!(cut[0].len(), 4);
    assert_eq!(
        tok.decode(&tok.encode_prompts(&["a cat"], 512).expect("encode")[0])
            .expect("decode"),
        PromptTokenizer::chat_text("a cat")
    );
}

/// Runs every case of `config` through `model`; returns the worst (relative L2, max abs) error
/// against `key` (`features` or `features64`).
fn run_cases(config: &str, model: &Qwen3TextEncoder<B>, cases: &[&str], key: &str) -> (f64, f64) {
    let mut worst = (0f64, 0f64);
    for case_name in cases {
        let path = text_fixtures()
            .join(config)
            .join("cases")
            .join(format!("{case_name}.safetensors"));
        let case = Case::open(path);
        let n = case.count("ids");
        let batch: Vec<Vec<u32>> = (0..n).map(|i| case.ids(&format!("ids.{i}"))).collect();
        let out = model.encode(&batch).expect("encode");
        assert_eq!(out.len(), n);
        for (i, features) in out.into_iter().enumerate() {
            let (expected, shape) = case.values(&format!("{key}.{i}"));
            assert_eq!(
                features.dims().to_vec(),
                shape,
                "{config}/{case_name}[{i}] shape"
            );
            let (rel, max) = errors(&to_vec(features), &expected);
            println!(
                "{config}/{case_name}[{i}] ({} tokens) vs {key}: rel L2 {rel:.3e}, max abs {max:.3e}",
                shape[0]
            );
            worst = (worst.0.max(rel), worst.1.max(max));
        }
    }
    worst
}

fn load(config: &str) -> Qwen3TextEncoder<B> {
    let device = Default::default();
    Qwen3TextEncoder::<B>::from_folder(
        text_fixtures().join(config).join("text_encoder"),
        &device,
        DType::F32,
    )
    .unwrap_or_else(|e| panic!("load {config}: {e}"))
}

#[test]
fn f32_matches_transformers() {
    // With the host kernels (the CPU's) and without them (the generic path GPUs run).
    common::on_both_paths(|path| {
        for (config, cases) in CASES {
            let model = load(config);
            let (rel, max) = run_cases(config, &model, cases, "features");
            println!("{path:?} config {config}: worst rel L2 {rel:.3e}, max abs {max:.3e}");
            assert!(
                rel <= REL_L2 && max <= MAX_ABS,
                "config {config}: rel L2 {rel:.3e}, max abs {max:.3e}"
            );
            // And against transformers in float64: the same distance, f32 rounding on both sides.
            let (rel64, _) = run_cases(config, &model, cases, "features64");
            assert!(
                rel64 <= REL_L2,
                "config {config}: rel L2 {rel64:.3e} against f64"
            );
        }
    });
}

#[test]
fn attention_implementations_agree() {
    for imp in [AttentionImpl::Backend, AttentionImpl::Reference] {
        let model = load("a").with_attention(imp);
        let (rel, max) = run_cases("a", &model, CASES[0].1, "features");
        println!("{imp:?}: worst rel L2 {rel:.3e}, max abs {max:.3e}");
        assert!(rel <= REL_L2 && max <= MAX_ABS, "{imp:?}: rel L2 {rel:.3e}");
    }
}

#[test]
fn a_batch_gives_each_prompt_its_own_features() {
    for (config, case_name) in [("a", "batch3"), ("a", "long"), ("c", "batch3")] {
        let model = load(config);
        let path = text_fixtures()
            .join(config)
            .join("cases")
            .join(format!("{case_name}.safetensors"));
        let case = Case::open(path);
        let n = case.count("ids");
        let batch: Vec<Vec<u32>> = (0..n).map(|i| case.ids(&format!("ids.{i}"))).collect();
        let together = model.encode(&batch).expect("batch");
        for (i, prompt) in batch.iter().enumerate() {
            let alone = model.encode(std::slice::from_ref(prompt)).expect("alone");
            let (rel, max) = errors(&to_vec(together[i].clone()), &to_vec(alone[0].clone()));
            println!(
                "{config}/{case_name}[{i}] batch vs alone: rel L2 {rel:.3e}, max abs {max:.3e}"
            );
            assert!(rel <= 1e-6, "{config}/{case_name}[{i}]: rel L2 {rel:.3e}");
        }
    }
}

#[derive(Deserialize)]
struct PipelineCase {
    prompts: Vec<String>,
    max_sequence_lengths: Vec<usize>,
}

#[test]
fn prompts_to_features_match_diffusers_encode_prompt() {
    let dir = text_fixtures().join("real");
    let tok = tokenizer();
    // bf16 shards with the `model.` prefix and the published config.json, loaded into f32.
    let model = load("real");
    assert_eq!(model.config().vocab_size, 151_936);
    let spec: PipelineCase =
        serde_json::from_str(&std::fs::read_to_string(dir.join("pipeline.json")).expect("fixture"))
            .expect("json");
    let case = Case::open(dir.join("pipeline.safetensors"));
    let mut worst = (0f64, 0f64);
    for &max_len in &spec.max_sequence_lengths {
        let positive = model
            .encode_prompts(&tok, &spec.prompts, max_len)
            .expect("encode");
        let negative = model
            .encode_prompts(&tok, &vec![""; spec.prompts.len()], max_len)
            .expect("encode negative");
        let got_ids = tok.encode_prompts(&spec.prompts, max_len).expect("ids");
        for i in 0..spec.prompts.len() {
            assert_eq!(
                got_ids[i],
                case.ids(&format!("len{max_len}.ids.{i}")),
                "ids {i}"
            );
            for (kind, features) in [("prompt", &positive[i]), ("negative", &negative[i])] {
                let (expected, shape) = case.values(&format!("len{max_len}.{kind}.{i}"));
                assert_eq!(features.dims().to_vec(), shape, "{kind} {i}");
                let (rel, max) = errors(&to_vec(features.clone()), &expected);
                println!(
                    "max_sequence_length {max_len}, {kind} {i} ({} tokens): rel L2 {rel:.3e}, max abs {max:.3e}",
                    shape[0]
                );
                worst = (worst.0.max(rel), worst.1.max(max));
            }
        }
    }
    println!("worst: rel L2 {:.3e}, max abs {:.3e}", worst.0, worst.1);
    assert!(
        worst.0 <= REL_L2 && worst.1 <= MAX_ABS,
        "rel L2 {:.3e}, max abs {:.3e}",
        worst.0,
        worst.1
    );
}

#[test]
fn features_keep_the_weights_dtype_and_hidden_size() {
    let model = load("b");
    let out: Vec<Tensor<B, 2>> = model.encode(&[vec![1u32, 2, 3]]).expect("encode");
    assert_eq!(out[0].dims(), [3, 48]);
    assert_eq!(out[0].dtype(), DType::F32);
    assert!(model
        .encode::<Vec<u32>>(&[])
        .expect("empty batch")
        .is_empty());
}
