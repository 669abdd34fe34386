use burn::tensor::{DType, Tensor};

use crate::{CheckpointError, Stored, Weights, ZBackend};

/// `nn.Embedding`: rows of a `[vocab, dim]` table (on the host, read in the stored precision).
#[derive(Debug, Clone)]
pub struct Embedding<B: ZBackend> {
    pub table: Stored<B, 2>,
    vocab_size: usize,
    dim: usize,
    dtype: DType,
    device: B::Device,
}

impl<B: ZBackend> Embedding<B> {
    pub fn load(w: &Weights<B>, vocab_size: usize, dim: usize) -> Result<Self, CheckpointError> {
        Ok(Self {
            table: w.matrix("weight", [vocab_size, dim])?,
            vocab_size,
            dim,
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The dtype of the rows it returns.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Ids must be below the vocabulary size (callers check; an id past it panics).
    ///
    /// # Shapes
    /// `n` ids -> `[n, dim]`
    pub fn forward(&self, ids: &[u32]) -> Tensor<B, 2> {
        B::embed(self, ids)
    }
}
