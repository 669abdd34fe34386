//! Bad input to the tokenizer and the text encoder gets a typed error, never a panic.

use zimage_test_support as common;

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use common::{errors, fixtures, to_vec, B};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use zimage_text::{PromptTokenizer, Qwen3TextEncoder, TextError};

fn text_fixtures() -> PathBuf {
    fixtures().join("text")
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("text_errors")
        .join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).expect("clean scratch");
    }
    std::fs::create_dir_all(&dir).expect("scratch");
    dir
}

fn load(folder: &Path) -> Result<Qwen3TextEncoder<B>, TextError> {
    Qwen3TextEncoder::<B>::from_folder(folder, &Default::default(), DType::F32)
}

/// A word-level tokenizer of `words` words (`w0`, `w1`, ...) followed by the two template tokens,
/// which get the next ids (as in transformers, an added token's id is its place after the model's
/// vocabulary, whatever the file says).
fn small_tokenizer(words: usize) -> String {
    let vocab: Vec<String> = (0..words).map(|i| format!("\"w{i}\": {i}")).collect();
    let added = |id: usize, content: &str| {
        format!(
            r#"{{"id": {id}, "content": "{content}", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}}"#
        )
    };
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{}, {}],
            "normalizer": null, "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null,
            "decoder": null,
            "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "w0"}}}}"#,
        added(words, "<|im_start|>"),
        added(words + 1, "<|im_end|>"),
        vocab.join(", ")
    )
}

#[test]
fn missing_tokenizer_file() {
    let dir = scratch("missing_tokenizer");
    match PromptTokenizer::from_folder(&dir) {
        Err(TextError::Io { path, .. }) => assert_eq!(path, dir.join("tokenizer.json")),
        other => panic!("expected Io, got {other:?}"),
    }
    let err = PromptTokenizer::from_file(dir.join("nope.json")).unwrap_err();
    assert!(err.to_string().contains("nope.json"), "{err}");
}

#[test]
fn malformed_tokenizer() {
    let dir = scratch("malformed_tokenizer");
    let file = dir.join("tokenizer.json");
    std::fs::write(&file, "{\"version\": \"1.0\", \"model\": ").expect("write");
    match PromptTokenizer::from_file(&file) {
        Err(TextError::Tokenizer { path, .. }) => assert_eq!(path, Some(file.clone())),
        other => panic!("expected Tokenizer, got {other:?}"),
    }
    // Valid JSON, but not a tokenizer with the chat template's tokens.
    let without_template = small_tokenizer(4).replace("<|im_start|>", "<s>");
    match PromptTokenizer::from_bytes(without_template.as_bytes()) {
        Err(TextError::Tokenizer { reason, .. }) => {
            assert!(reason.contains("<|im_start|>"), "{reason}")
        }
        other => panic!("expected Tokenizer, got {other:?}"),
    }
}

#[test]
fn tokenizer_and_model_vocab_mismatch() {
    let tok = PromptTokenizer::from_bytes(small_tokenizer(1998).as_bytes()).expect("tokenizer");
    assert_eq!(tok.vocab_size(), 2000);
    // <|im_start|> user w7 w1000 <|im_end|> <|im_start|> assistant ("user", "assistant": unknown, id 0)
    let ids = tok.encode_prompts(&["w7 w1000"], 512).expect("encode");
    assert_eq!(ids[0], [1998, 0, 7, 1000, 1999, 1998, 0]);
    let model = load(&text_fixtures().join("a/text_encoder")).expect("load a");
    assert_eq!(model.config().vocab_size, 1000);
    match model.encode_prompts(&tok, &["a cat"], 512) {
        Err(TextError::VocabMismatch { tokenizer, model }) => {
            assert_eq!((tokenizer, model), (2000, 1000))
        }
        other => panic!("expected VocabMismatch, got {other:?}"),
    }
    // Ids from elsewhere are checked one by one.
    match model.encode(&[vec![1, 2], vec![3, 1000, 4]]) {
        Err(TextError::TokenOutOfRange {
            prompt,
            position,
            id,
            vocab_size,
        }) => assert_eq!((prompt, position, id, vocab_size), (1, 1, 1000, 1000)),
        other => panic!("expected TokenOutOfRange, got {other:?}"),
    }
    assert!(matches!(
        model.encode(&[vec![1], vec![]]),
        Err(TextError::Input(_))
    ));
    assert!(matches!(
        tok.encode_prompts(&["a"], 0),
        Err(TextError::Input(_))
    ));
}

/// Copies `config`'s `text_encoder/` into a scratch folder.
fn copy_encoder(config: &str, name: &str) -> PathBuf {
    let dir = scratch(name);
    for entry in
        std::fs::read_dir(text_fixtures().join(config).join("text_encoder")).expect("fixture")
    {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.join(entry.file_name())).expect("copy");
    }
    dir
}

#[test]
fn malformed_config() {
    let dir = copy_encoder("a", "malformed_config");
    for (text, hint) in [
        ("{\"hidden_size\": 64,", "EOF"),
        (
            "{\"num_attention_heads\": 4, \"num_key_value_heads\": 3}",
            "num_key_value_heads",
        ),
        ("{\"hidden_act\": \"gelu\"}", "hidden_act"),
        ("{\"hidden_size\": -64}", "expected usize"),
    ] {
        std::fs::write(dir.join("config.json"), text).expect("write");
        match load(&dir) {
            Err(TextError::Config { path, reason }) => {
                assert_eq!(path, Some(dir.join("config.json")));
                assert!(reason.contains(hint), "{text}: {reason}");
            }
            other => panic!("{text}: expected Config, got {other:?}"),
        }
    }
    std::fs::remove_file(dir.join("config.json")).expect("remove");
    assert!(matches!(load(&dir), Err(TextError::Io { .. })));
}

/// Owned copies of a safetensors file's tensors.
fn read_tensors(file: &Path) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(file).expect("fixture");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_tensors(file: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, file).expect("write");
}

#[test]
fn missing_misshapen_and_unexpected_tensors_are_all_reported() {
    // Config b: 2 layers, head_dim 32, f32 names without prefix.
    let dir = copy_encoder("b", "bad_tensors");
    let file = dir.join("model.safetensors");
    let mut tensors = read_tensors(&file);
    tensors.retain(|t| t.0 != "layers.0.self_attn.q_norm.weight");
    for t in tensors.iter_mut() {
        if t.0 == "layers.0.self_attn.k_norm.weight" {
            t.2 = vec![16];
            t.3.truncate(16 * 4);
        }
    }
    tensors.push((
        "layers.0.self_attn.extra.weight".into(),
        Dtype::F32,
        vec![2],
        vec![0; 8],
    ));
    write_tensors(&file, &tensors);
    let err = match load(&dir) {
        Err(TextError::Checkpoint(err)) => err,
        other => panic!("expected Checkpoint, got {other:?}"),
    };
    let report = err.report().expect("a mismatch report");
    assert_eq!(report.missing, ["layers.0.self_attn.q_norm.weight"]);
    assert_eq!(report.unexpected, ["layers.0.self_attn.extra.weight"]);
    assert_eq!(report.wrong_shape.len(), 1);
    let shape = &report.wrong_shape[0];
    assert_eq!(shape.tensor, "layers.0.self_attn.k_norm.weight");
    assert_eq!(
        (shape.expected.clone(), shape.actual.clone()),
        (vec![32], vec![16])
    );
    let message = TextError::Checkpoint(err).to_string();
    assert!(
        message.contains("model.safetensors") && message.contains("k_norm"),
        "{message}"
    );
}

#[test]
fn unused_tensors_may_be_absent() {
    // The last layer and the final norm are never read: a checkpoint without them loads and
    // gives the same features.
    let dir = copy_encoder("b", "without_unused");
    let file = dir.join("model.safetensors");
    let mut tensors = read_tensors(&file);
    let before = tensors.len();
    tensors.retain(|t| !t.0.starts_with("layers.1.") && t.0 != "norm.weight");
    assert_eq!(before - tensors.len(), 12);
    write_tensors(&file, &tensors);
    let trimmed = load(&dir).expect("load trimmed");
    let full = load(&text_fixtures().join("b/text_encoder")).expect("load full");
    let ids = [vec![5u32, 9, 200, 7]];
    let a = to_vec(trimmed.encode(&ids).expect("encode").remove(0));
    let b = to_vec(full.encode(&ids).expect("encode").remove(0));
    assert_eq!(errors(&a, &b), (0.0, 0.0));
}

#[test]
fn missing_checkpoint() {
    let dir = scratch("missing_checkpoint");
    std::fs::copy(
        text_fixtures().join("a/text_encoder/config.json"),
        dir.join("config.json"),
    )
    .expect("copy");
    assert!(matches!(load(&dir), Err(TextError::Checkpoint(_))));
}
