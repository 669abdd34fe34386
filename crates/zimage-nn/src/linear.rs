use burn::tensor::{DType, Tensor};

use crate::delta::{SideProduct, WeightDelta};
use crate::host::{HostFormat, HostMatrix};
use crate::{CheckpointError, Stored, Weights, ZBackend};

/// `y = x W^T + b`, loaded from a PyTorch `nn.Linear` (`weight [out, in]`, optional `bias [out]`).
#[derive(Debug, Clone)]
pub struct Linear<B: ZBackend> {
    /// On the device transposed to `[in, out]` (the product needs no copy); on the host as stored,
    /// `[out, in]`.
    pub weight: Stored<B, 2>,
    pub bias: Option<Tensor<B, 1>>,
    in_features: usize,
    out_features: usize,
    /// The weight as loaded, while an adapter's change is merged into `weight`.
    original: Option<Stored<B, 2>>,
    /// An adapter's change run beside a weight that cannot take it merged (quantized blocks).
    side: Option<SideProduct<B>>,
}

impl<B: ZBackend> Linear<B> {
    pub fn load(
        w: &Weights<B>,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self, CheckpointError> {
        Self::load_stored_as(
            w,
            in_features,
            out_features,
            bias,
            &[out_features, in_features],
        )
    }

    /// A Linear whose weight the checkpoint stores under another shape of the same `[out, in]`
    /// values (a 1x1 convolution's `[out, in, 1, 1]`).
    pub fn load_stored_as(
        w: &Weights<B>,
        in_features: usize,
        out_features: usize,
        bias: bool,
        stored_shape: &[usize],
    ) -> Result<Self, CheckpointError> {
        Ok(Self {
            weight: w.linear_weight("weight", out_features, in_features, stored_shape)?,
            bias: if bias {
                Some(w.tensor("bias", [out_features])?)
            } else {
                None
            },
            in_features,
            out_features,
            original: None,
            side: None,
        })
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// # Shapes
    /// `[..., in]` -> `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match &self.side {
            None => B::project(self, x),
            Some(side) => B::project(self, x.clone()) + side.forward(x),
        }
    }

    /// Applies `delta` (an adapter's change, [`WeightDelta`]) in place of the previous one;
    /// `None` restores the weight as loaded, exactly.
    ///
    /// Where it goes: merged into a float weight (in f32, stored back in the weight's precision)
    /// when keeping the weight as loaded costs nothing (it is the checkpoint's mapped pages) or
    /// the change is full rank (LoKr, LoHa: a dense change beside the weight would cost more
    /// than a merged copy); otherwise run beside the weight, in `dtype` on `device` (the
    /// model's compute dtype and device): quantized blocks, which a merge would requantize, and
    /// weights held in memory of their own, which a merge would double.
    ///
    /// # Panics
    /// If `delta` is not `[out, in]` (callers match adapters to the model first).
    pub fn set_delta(&mut self, delta: Option<&WeightDelta>, device: &B::Device, dtype: DType) {
        let merge = delta.is_some_and(|d| {
            let float = match &self.weight {
                Stored::Device(_) => true,
                Stored::Host(m) => !matches!(m.format(), HostFormat::Quantized(_)),
                Stored::Quantized(_) => false,
            };
            let free_to_keep = matches!(&self.weight, Stored::Host(m) if m.is_mapped());
            float && (free_to_keep || d.rank().is_none())
        });
        self.apply_delta(delta, merge, device, dtype);
    }

    /// [`Self::set_delta`] with the choice made by the caller: `merge` a float weight (the
    /// weight as loaded is kept beside the merged one), or run the change beside it.
    pub fn apply_delta(
        &mut self,
        delta: Option<&WeightDelta>,
        merge: bool,
        device: &B::Device,
        dtype: DType,
    ) {
        if let Some(original) = self.original.take() {
            self.weight = original;
        }
        self.side = None;
        let Some(delta) = delta else { return };
        assert_eq!(
            delta.shape(),
            [self.out_features, self.in_features],
            "an adapter's change has the weight's shape"
        );
        let merged = match &self.weight {
            _ if !merge => None,
            Stored::Device(w) => {
                let sum = w.clone().cast(DType::F32) + delta.transposed_on::<B>(&w.device());
                Some(Stored::Device(sum.cast(w.dtype())))
            }
            Stored::Host(m) if !matches!(m.format(), HostFormat::Quantized(_)) => {
                let mut values = m.to_f32();
                delta.add_to(&mut values);
                Some(Stored::Host(HostMatrix::from_f32(
                    m.rows(),
                    m.cols(),
                    &values,
                    m.format(),
                )))
            }
            Stored::Host(_) | Stored::Quantized(_) => None,
        };
        match merged {
            Some(merged) => self.original = Some(std::mem::replace(&mut self.weight, merged)),
            None => self.side = Some(delta.side_product(device, dtype)),
        }
    }

    /// Whether the change is merged into the weight (`Some(true)`), beside it (`Some(false)`),
    /// or there is none.
    pub fn delta_merged(&self) -> Option<bool> {
        match (&self.original, &self.side) {
            (Some(_), _) => Some(true),
            (None, Some(_)) => Some(false),
            (None, None) => None,
        }
    }
}
