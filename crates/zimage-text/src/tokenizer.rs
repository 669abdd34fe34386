//! Prompt -> token ids, as diffusers' `ZImagePipeline._encode_prompt` tokenizes.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::TextError;

/// diffusers' default `max_sequence_length`.
pub const DEFAULT_MAX_SEQUENCE_LENGTH: usize = 512;

/// Tokens the chat template is made of; a tokenizer without them is not a Qwen tokenizer.
const TEMPLATE_TOKENS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];

/// The built-in Qwen3 `tokenizer.json` ([`PromptTokenizer::qwen3`]), decompressed.
pub fn qwen3_tokenizer_json() -> Result<Vec<u8>, TextError> {
    use std::io::Read;
    static GZIPPED: &[u8] = include_bytes!("../assets/qwen3-tokenizer.json.gz");
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(GZIPPED)
        .read_to_end(&mut json)
        .map_err(|e| TextError::Tokenizer {
            path: None,
            reason: format!("the built-in tokenizer does not decompress: {e}"),
        })?;
    Ok(json)
}

/// The Qwen3 tokenizer (`tokenizer/tokenizer.json`) with Z-Image's prompt template.
///
/// Special-token text in a prompt (`<|im_end|>`, `<think>`) becomes that token, as it does in
/// transformers: added tokens are matched in the raw text before anything else.
#[derive(Clone)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    /// One past the largest id, added tokens included.
    vocab_size: usize,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl PromptTokenizer {
    /// Reads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, TextError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TextError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes, Some(path.to_path_buf()))
    }

    /// Reads `tokenizer.json` in a checkpoint's `tokenizer/` folder.
    pub fn from_folder(folder: impl AsRef<Path>) -> Result<Self, TextError> {
        Self::from_file(folder.as_ref().join("tokenizer.json"))
    }

    /// The Qwen3 tokenizer built into the library (Qwen2, 2.5 and 3 share it): the model's
    /// `tokenizer.json`, rebuilt from Qwen's Apache-2.0 BPE ranks (`tests/fixtures/make_qwen3_tokenizer.py`)
    /// and gzipped into the binary (1.8 MB), for models given as single weight files.
    pub fn qwen3() -> Result<Self, TextError> {
        Self::from_bytes(&qwen3_tokenizer_json()?)
    }

    /// Parses the contents of a `tokenizer.json`.
    pub fn from_bytes(json: &[u8]) -> Result<Self, TextError> {
        Self::parse(json, None)
    }

    fn parse(json: &[u8], path: Option<PathBuf>) -> Result<Self, TextError> {
        let fail = |reason: String| TextError::Tokenizer {
            path: path.clone(),
            reason,
        };
        let mut tokenizer = Tokenizer::from_bytes(json).map_err(|e| fail(e.to_string()))?;
        for token in TEMPLATE_TOKENS {
            if tokenizer.token_to_id(token).is_none() {
                return Err(fail(format!(
                    "it has no {token} token, which the chat template needs"
                )));
            }
        }
        // Truncation and padding happen here, explicitly, as diffusers asks for them; settings
        // stored in the file would otherwise apply silently.
        tokenizer
            .with_truncation(None)
            .map_err(|e| fail(e.to_string()))?;
        tokenizer.with_padding(None);
        let vocab_size = tokenizer
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1);
        Ok(Self {
            tokenizer,
            vocab_size,
        })
    }

    /// The text Z-Image encodes for `prompt`: Qwen3's chat template for one user turn with the
    /// generation prompt and `enable_thinking=True` (which adds no think block).
    pub fn chat_text(prompt: &str) -> String {
        format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
    }

    /// Ids of `text` as it is (no template, no truncation).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, TextError> {
        // `add_special_tokens` as transformers passes it; Qwen's post-processor adds nothing.
        let encoding =
            self.tokenizer
                .encode_fast(text, true)
                .map_err(|e| TextError::Tokenizer {
                    path: None,
                    reason: format!("cannot encode {text:?}: {e}"),
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids of each prompt's chat text, truncated to `max_sequence_length` (the template's tail is
    /// cut from very long prompts, as in diffusers), without padding.
    pub fn encode_prompts<S: AsRef<str>>(
        &self,
        prompts: &[S],
        max_sequence_length: usize,
    ) -> Result<Vec<Vec<u32>>, TextError> {
        if max_sequence_length == 0 {
            return Err(TextError::Input(
                "max_sequence_length must be positive".into(),
            ));
        }
        prompts
            .iter()
            .map(|prompt| {
                let mut ids = self.encode_text(&Self::chat_text(prompt.as_ref()))?;
                ids.truncate(max_sequence_length);
                Ok(ids)
            })
            .collect()
    }

    /// One past the largest token id (151669 for Qwen3: 151643 BPE tokens and 26 added ones).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The text of `ids` (special tokens kept), for messages and checks.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| TextError::Tokenizer {
                path: None,
                reason: format!("cannot decode: {e}"),
            })
    }
}
