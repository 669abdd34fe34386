use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong while reading a checkpoint into a model.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no .safetensors file or *.safetensors.index.json in {path}")]
    NotFound { path: PathBuf },
    #[error("{path} holds several checkpoints ({}); name the file to load", candidates.join(", "))]
    Ambiguous {
        path: PathBuf,
        candidates: Vec<String>,
    },
    #[error("malformed index {path}: {reason}")]
    MalformedIndex { path: PathBuf, reason: String },
    #[error("malformed safetensors file {path}: {reason}")]
    MalformedSafetensors { path: PathBuf, reason: String },
    #[error("malformed GGUF file {path}: {reason}")]
    MalformedGguf { path: PathBuf, reason: String },
    #[error("{file}: tensor {tensor} is stored as {dtype}; only F32, BF16 and F16 weights (and ggml blocks from GGUF files) can be loaded")]
    UnsupportedDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{0}")]
    Mismatch(Box<MismatchReport>),
    #[error("{file}: {source}")]
    TooLarge {
        file: PathBuf,
        #[source]
        source: crate::device::TooLarge,
    },
}

impl CheckpointError {
    pub fn mismatch(report: MismatchReport) -> Self {
        Self::Mismatch(Box::new(report))
    }

    /// The mismatch report, when this error is one.
    pub fn report(&self) -> Option<&MismatchReport> {
        match self {
            Self::Mismatch(report) => Some(report),
            _ => None,
        }
    }
}

/// Every difference between the tensors a model expects and those a checkpoint holds.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MismatchReport {
    /// The checkpoint (file or index) that was compared.
    pub file: PathBuf,
    /// Expected by the model, absent from the checkpoint.
    pub missing: Vec<String>,
    /// In the checkpoint, unknown to the model.
    pub unexpected: Vec<String>,
    /// Present with another shape.
    pub wrong_shape: Vec<ShapeMismatch>,
    /// Present with a dtype that is not a float the loader can cast.
    pub wrong_dtype: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShapeMismatch {
    pub tensor: String,
    pub expected: Vec<usize>,
    pub actual: Vec<usize>,
}

impl MismatchReport {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.wrong_shape.is_empty()
            && self.wrong_dtype.is_empty()
    }
}

/// Long lists are cut so that a wrong file does not print thousands of lines.
const SHOWN: usize = 12;

impl fmt::Display for MismatchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} does not match the model:", self.file.display())?;
        let list = |f: &mut fmt::Formatter<'_>, title: &str, items: Vec<String>| -> fmt::Result {
            if items.is_empty() {
                return Ok(());
            }
            write!(f, "\n  {} {title}:", items.len())?;
            for item in items.iter().take(SHOWN) {
                write!(f, "\n    {item}")?;
            }
            if items.len() > SHOWN {
                write!(f, "\n    ... and {} more", items.len() - SHOWN)?;
            }
            Ok(())
        };
        list(f, "missing tensors", self.missing.clone())?;
        list(
            f,
            "tensors with the wrong shape",
            self.wrong_shape
                .iter()
                .map(|m| {
                    format!(
                        "{}: expected {:?}, found {:?}",
                        m.tensor, m.expected, m.actual
                    )
                })
                .collect(),
        )?;
        list(
            f,
            "tensors with an unsupported dtype",
            self.wrong_dtype
                .iter()
                .map(|(name, dtype)| format!("{name}: {dtype} (F32, BF16 or F16 expected)"))
                .collect(),
        )?;
        list(f, "unexpected tensors", self.unexpected.clone())
    }
}
