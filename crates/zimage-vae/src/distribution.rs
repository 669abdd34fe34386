use burn::tensor::Tensor;
use zimage_nn::ZBackend;

use crate::VaeError;

/// Bounds of the log-variance, as diffusers clamps it.
const LOGVAR_MIN: f64 = -30.0;
const LOGVAR_MAX: f64 = 20.0;

/// The latent posterior the encoder predicts: a Gaussian with diagonal covariance per latent
/// pixel (diffusers' `DiagonalGaussianDistribution`).
#[derive(Debug, Clone)]
pub struct DiagonalGaussianDistribution<B: ZBackend> {
    /// `[batch, latent_channels, h, w]`
    pub mean: Tensor<B, 4>,
    /// `[batch, latent_channels, h, w]`, clamped to [-30, 20].
    pub logvar: Tensor<B, 4>,
}

impl<B: ZBackend> DiagonalGaussianDistribution<B> {
    /// Splits the encoder's moments: the first half of the channels is the mean, the second the
    /// log-variance.
    ///
    /// # Shapes
    /// moments `[batch, 2 * latent_channels, h, w]`
    pub fn new(moments: Tensor<B, 4>) -> Self {
        let channels = moments.dims()[1] / 2;
        let mean = moments.clone().narrow(1, 0, channels);
        let logvar = moments
            .narrow(1, channels, channels)
            .clamp(LOGVAR_MIN, LOGVAR_MAX);
        Self { mean, logvar }
    }

    /// The most likely latents (the mean), what img2img uses when not sampling.
    pub fn mode(&self) -> Tensor<B, 4> {
        self.mean.clone()
    }

    /// `exp(0.5 * logvar)`
    pub fn std(&self) -> Tensor<B, 4> {
        self.logvar.clone().mul_scalar(0.5).exp()
    }

    /// `exp(logvar)`
    pub fn var(&self) -> Tensor<B, 4> {
        self.logvar.clone().exp()
    }

    /// `mean + std * noise`. The caller draws `noise` (standard normal, the shape of the mean),
    /// so that a torch-compatible generator can reproduce diffusers' samples.
    pub fn sample(&self, noise: Tensor<B, 4>) -> Result<Tensor<B, 4>, VaeError> {
        if noise.dims() != self.mean.dims() {
            return Err(VaeError::NoiseShape {
                expected: self.mean.dims().to_vec(),
                actual: noise.dims().to_vec(),
            });
        }
        let noise = noise.cast(self.mean.dtype());
        Ok(self.mean.clone() + self.std() * noise)
    }
}
