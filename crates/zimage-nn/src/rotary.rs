//! Rotary position embeddings: the cos/sin table of one pass, rotated in by the backend.

use std::sync::Arc;

use burn::tensor::{DType, Tensor, TensorData};

use crate::ZBackend;

/// Which dimensions of a head rotate together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotaryLayout {
    /// Adjacent pairs `(x[2j], x[2j + 1])`, in f32 and cast back: the DiT (diffusers multiplies
    /// them as complex numbers).
    Interleaved,
    /// `(x[j], x[j + d/2])` in the activation dtype: Qwen3 (transformers' `rotate_half`).
    Halves,
}

/// cos and sin of one pass's angles, `[items, tokens, pairs]` row-major, f32; `items` is 1 when
/// every batch item shares the positions, else the batch size.
#[derive(Debug, Clone)]
pub struct RotaryTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub items: usize,
    pub tokens: usize,
    pub pairs: usize,
}

/// A pass's rotation: the host table, and on backends that rotate on the device the same values
/// as tensors `[items, tokens, 1, pairs]`.
#[derive(Debug, Clone)]
pub struct Rotary<B: ZBackend> {
    layout: RotaryLayout,
    table: Arc<RotaryTable>,
    device: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: ZBackend> Rotary<B> {
    pub fn new(layout: RotaryLayout, table: RotaryTable, device: &B::Device) -> Self {
        assert_eq!(
            table.cos.len(),
            table.items * table.tokens * table.pairs,
            "rotary table"
        );
        assert_eq!(table.sin.len(), table.cos.len(), "rotary table");
        let table = Arc::new(table);
        let device = (!B::host_kernels(device)).then(|| upload(&table, device));
        Self {
            layout,
            table,
            device,
        }
    }

    pub fn layout(&self) -> RotaryLayout {
        self.layout
    }

    pub fn table(&self) -> &RotaryTable {
        &self.table
    }

    /// cos and sin as f32 tensors `[items, tokens, 1, pairs]`.
    pub fn device_tables(&self, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match &self.device {
            Some(tables) => tables.clone(),
            None => upload(&self.table, device),
        }
    }

    /// Rotates `x`.
    ///
    /// # Shapes
    /// `[batch, tokens, heads, head_dim]` -> the same
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        B::rotate(self, x)
    }
}

fn upload<B: ZBackend>(table: &RotaryTable, device: &B::Device) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let shape = [table.items, table.tokens, 1, table.pairs];
    let tensor = |values: &[f32]| {
        Tensor::<B, 4>::from_data(
            TensorData::new(values.to_vec(), shape),
            (device, DType::F32),
        )
    };
    (tensor(&table.cos), tensor(&table.sin))
}
