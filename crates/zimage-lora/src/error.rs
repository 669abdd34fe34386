use std::path::PathBuf;

use zimage_nn::CheckpointError;

/// Why an adapter cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "{file} is not a LoRA (no lora_A/lora_B, lora_down/lora_up, lokr_* or hada_* tensors; \
         it holds {})",
        sample(keys)
    )]
    NotALora { file: PathBuf, keys: Vec<String> },
    #[error("{file}: {module} has {} but not {missing}", has.join(", "))]
    Incomplete {
        file: PathBuf,
        module: String,
        has: Vec<String>,
        missing: String,
    },
    #[error("{file}: {key} is {what}, which zimage-rs does not apply")]
    Unsupported {
        file: PathBuf,
        key: String,
        what: String,
    },
    #[error("{file}: {key} has shape {shape:?}; {expected}")]
    BadShape {
        file: PathBuf,
        key: String,
        shape: Vec<usize>,
        expected: String,
    },
    #[error(
        "{file} does not fit this model:{}{}",
        list_unmatched(unmatched),
        list_shapes(wrong_shape)
    )]
    DoesNotFit {
        file: PathBuf,
        /// Adapter modules naming no layer of the model.
        unmatched: Vec<String>,
        /// `(module, the layer's [out, in], the adapter's [out, in])`.
        wrong_shape: Vec<(String, [usize; 2], [usize; 2])>,
    },
}

fn sample(keys: &[String]) -> String {
    match keys.len() {
        0 => "no tensors".to_string(),
        n if n <= 3 => keys.join(", "),
        n => format!("{}, ... ({n} tensors)", keys[..3].join(", ")),
    }
}

fn list_unmatched(unmatched: &[String]) -> String {
    if unmatched.is_empty() {
        return String::new();
    }
    let mut s = format!("\n  {} modules name no layer of it:", unmatched.len());
    for m in unmatched {
        s.push_str("\n    ");
        s.push_str(m);
    }
    s
}

fn list_shapes(wrong: &[(String, [usize; 2], [usize; 2])]) -> String {
    if wrong.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "\n  {} modules change a weight of another shape ([out, in]):",
        wrong.len()
    );
    for (m, layer, adapter) in wrong {
        s.push_str(&format!(
            "\n    {m}: the layer is {layer:?}, the adapter {adapter:?}"
        ));
    }
    s
}
