use std::path::Path;
use zimage_nn::ZBackend;

use burn::tensor::{Bool, DType, Tensor, TensorData};
use zimage_nn::{AttentionImpl, CheckpointError, Embedding, Precision, WeightMap, Weights};

use crate::checkpoint;
use crate::layer::{LayerContext, Qwen3DecoderLayer};
use crate::rope::Qwen3RotaryEmbedding;
use crate::{PromptTokenizer, Qwen3Config, TextError};

/// Z-Image's text encoder: transformers' `Qwen3Model` up to `hidden_states[-2]`, the output of the
/// second-to-last decoder layer without the final norm. Only the layers that feed that output
/// are loaded and run (35 of Qwen3-4B's 36).
///
/// The encoder owns its weights (about 8 GB for Qwen3-4B in bf16); dropping it frees them, so a
/// pipeline can encode its prompts first and release the encoder before loading the DiT.
#[derive(Debug, Clone)]
pub struct Qwen3TextEncoder<B: ZBackend> {
    /// `embed_tokens`, `[vocab_size, hidden_size]` (tied to the LM head, which is not needed).
    pub embed_tokens: Embedding<B>,
    /// `layers.{i}` for `i < num_hidden_layers - 1`.
    pub layers: Vec<Qwen3DecoderLayer<B>>,
    config: Qwen3Config,
    rope: Qwen3RotaryEmbedding,
    attention: AttentionImpl,
}

impl<B: ZBackend> Qwen3TextEncoder<B> {
    /// Builds the encoder through `w`; parameter paths are transformers' `Qwen3Model` names.
    pub fn build(config: &Qwen3Config, w: &Weights<B>) -> Result<Self, CheckpointError> {
        Ok(Self {
            embed_tokens: Embedding::load(
                &w.pp("embed_tokens"),
                config.vocab_size,
                config.hidden_size,
            )?,
            layers: (0..config.layers_used())
                .map(|i| Qwen3DecoderLayer::load(&w.pp("layers").pp(i), config))
                .collect::<Result<_, _>>()?,
            config: config.clone(),
            rope: Qwen3RotaryEmbedding::new(config.rope_theta(), config.head_dim()),
            attention: AttentionImpl::default(),
        })
    }

    /// Loads from a checkpoint with or without the `model.` prefix (see [`checkpoint`]); every
    /// weight matrix is held as `precision` says ([`Precision`]), the rest in its compute dtype.
    pub fn load(
        config: &Qwen3Config,
        checkpoint: zimage_nn::Checkpoint,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, TextError> {
        config.validate()?;
        let map = WeightMap::new(checkpoint, |name, _| checkpoint::map_key(config, name));
        Ok(zimage_nn::load_module(&map, device, precision, |w| {
            Self::build(config, w)
        })?)
    }

    /// Loads a `text_encoder/` folder: `config.json` and one safetensors file or shards with
    /// their index.
    pub fn from_folder(
        folder: impl AsRef<Path>,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, TextError> {
        let folder = folder.as_ref();
        let config = Qwen3Config::from_file(folder.join("config.json"))?;
        Self::load(
            &config,
            zimage_nn::Checkpoint::open(folder)?,
            device,
            precision,
        )
    }

    /// Random weights made on the device (benchmarks).
    pub fn random(
        config: &Qwen3Config,
        device: &B::Device,
        precision: impl Into<Precision>,
    ) -> Result<Self, TextError> {
        config.validate()?;
        Ok(Self::build(config, &Weights::random(device, precision))?)
    }

    pub fn config(&self) -> &Qwen3Config {
        &self.config
    }

    /// Chooses how attention is computed (the backend's op by default).
    pub fn with_attention(mut self, attention: AttentionImpl) -> Self {
        self.attention = attention;
        self
    }

    /// The compute dtype, and that of the features.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Features of a batch of token-id sequences: one `[len_i, hidden_size]` tensor per sequence,
    /// in the weights' dtype. Sequences may differ in length; the batch is padded on the right,
    /// and each prompt gets the features it would get alone. An empty batch gives an empty list.
    ///
    /// # Shapes
    /// `batch` sequences of `len_i` ids -> `batch` tensors `[len_i, hidden_size]`
    pub fn encode<S: AsRef<[u32]>>(&self, ids: &[S]) -> Result<Vec<Tensor<B, 2>>, TextError> {
        let vocab_size = self.config.vocab_size;
        let lens: Vec<usize> = ids.iter().map(|s| s.as_ref().len()).collect();
        let Some(&longest) = lens.iter().max() else {
            return Ok(Vec::new());
        };
        if let Some(i) = lens.iter().position(|&len| len == 0) {
            return Err(TextError::Input(format!("prompt {i} has no tokens")));
        }
        for (prompt, seq) in ids.iter().enumerate() {
            if let Some((position, &id)) = seq
                .as_ref()
                .iter()
                .enumerate()
                .find(|(_, &id)| id as usize >= vocab_size)
            {
                return Err(TextError::TokenOutOfRange {
                    prompt,
                    position,
                    id,
                    vocab_size,
                });
            }
        }

        let device = self.embed_tokens.device().clone();
        let batch = ids.len();
        let hidden = self.config.hidden_size;
        // Padding id 0: any valid id would do, padded rows are dropped.
        let flat: Vec<u32> = ids
            .iter()
            .flat_map(|seq| {
                let seq = seq.as_ref();
                seq.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, longest - seq.len()))
            })
            .collect();
        let mut x = zimage_nn::reshape(self.embed_tokens.forward(&flat), [batch, longest, hidden]);

        // With causal attention and right padding a real token never sees a padded key; the mask
        // (what transformers builds from `attention_mask`) also keeps padded rows well defined.
        let key_valid = lens.iter().any(|&len| len != longest).then(|| {
            let valid: Vec<bool> = lens
                .iter()
                .flat_map(|&len| (0..longest).map(move |j| j < len))
                .collect();
            Tensor::<B, 2, Bool>::from_data(TensorData::new(valid, [batch, longest]), &device)
        });
        let ctx = LayerContext {
            rope: self.rope.rotary(longest, &device),
            key_valid,
            attention: self.attention,
        };
        for layer in &self.layers {
            x = layer.forward(x, &ctx);
        }
        Ok(lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                x.clone()
                    .narrow(0, i, 1)
                    .reshape([longest, hidden])
                    .narrow(0, 0, len)
            })
            .collect())
    }

    /// Prompt -> features, as `ZImagePipeline.encode_prompt` computes them for one list of prompts
    /// (call it again with `""`s for the negative prompts). Refuses a tokenizer whose ids reach
    /// past this encoder's vocabulary.
    ///
    /// # Shapes
    /// `batch` prompts -> `batch` tensors `[tokens_i, hidden_size]`, `tokens_i <= max_sequence_length`
    pub fn encode_prompts<S: AsRef<str>>(
        &self,
        tokenizer: &PromptTokenizer,
        prompts: &[S],
        max_sequence_length: usize,
    ) -> Result<Vec<Tensor<B, 2>>, TextError> {
        if tokenizer.vocab_size() > self.config.vocab_size {
            return Err(TextError::VocabMismatch {
                tokenizer: tokenizer.vocab_size(),
                model: self.config.vocab_size,
            });
        }
        self.encode(&tokenizer.encode_prompts(prompts, max_sequence_length)?)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;

    use super::*;

    fn tiny(layers: usize) -> Qwen3Config {
        Qwen3Config {
            vocab_size: 50,
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: layers,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: Some(8),
            ..Qwen3Config::default()
        }
    }

    #[test]
    fn one_layer_model_returns_the_embeddings() {
        // hidden_states[-2] of a one-layer model is the embedding output: no layer runs.
        let device = Default::default();
        let model = Qwen3TextEncoder::<NdArray>::random(&tiny(1), &device, DType::F32).unwrap();
        assert!(model.layers.is_empty());
        let out = model.encode(&[vec![3u32, 1]]).unwrap();
        let rows = model.embed_tokens.forward(&[3, 1]);
        assert_eq!(out[0].to_data(), rows.to_data());
    }

    #[test]
    fn only_the_needed_layers_are_built() {
        let device = Default::default();
        let model = Qwen3TextEncoder::<NdArray>::random(&tiny(3), &device, DType::F32).unwrap();
        assert_eq!(model.layers.len(), 2);
        let out = model.encode(&[vec![1u32, 2, 3], vec![4]]).unwrap();
        assert_eq!(
            out.iter().map(|t| t.dims()).collect::<Vec<_>>(),
            [[3, 16], [1, 16]]
        );
    }
}
