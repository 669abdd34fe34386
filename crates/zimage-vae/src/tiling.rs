//! Tiled encoding and decoding, exactly as diffusers 0.42.1's `AutoencoderKL` does it
//! (`enable_tiling`, `tiled_decode`, `_tiled_encode`, `blend_v`, `blend_h`).
//!
//! The input is cut into overlapping square tiles, each tile goes through the encoder or
//! decoder alone, and each output tile is blended with its (already blended) neighbours above and
//! to the left over `blend_extent` rows/columns before being cropped to `row_limit`. Only one row
//! of output tiles is kept at a time besides the result.

use burn::tensor::{DType, Tensor, TensorData};
use zimage_nn::ZBackend;

use crate::{AutoencoderKLConfig, VaeError};

/// Tile sizes of tiled encode and decode (diffusers' `tile_sample_min_size`,
/// `tile_latent_min_size` and `tile_overlap_factor` attributes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TilingConfig {
    /// Side of an image tile, in pixels; images with a larger side are encoded in tiles.
    pub tile_sample_min_size: usize,
    /// Side of a latent tile; latents with a larger side are decoded in tiles.
    pub tile_latent_min_size: usize,
    /// Fraction of a tile shared with the next one, in [0, 1).
    pub tile_overlap_factor: f64,
}

impl TilingConfig {
    /// Image tiles of `tile_sample_size` pixels and the latent tiles that correspond
    /// (`int(tile_sample_size / 2^(blocks - 1))`, as diffusers derives them), a quarter overlapping.
    pub fn for_sample_size(tile_sample_size: usize, config: &AutoencoderKLConfig) -> Self {
        Self {
            tile_sample_min_size: tile_sample_size,
            tile_latent_min_size: tile_sample_size / config.downscale_factor(),
            tile_overlap_factor: 0.25,
        }
    }

    pub fn with_overlap(self, tile_overlap_factor: f64) -> Self {
        Self {
            tile_overlap_factor,
            ..self
        }
    }

    fn check(&self) -> Result<(), VaeError> {
        let f = self.tile_overlap_factor;
        if !(0.0..1.0).contains(&f) {
            return Err(VaeError::Tiling(format!(
                "tile_overlap_factor {f} is not in [0, 1)"
            )));
        }
        if self.tile_sample_min_size == 0 || self.tile_latent_min_size == 0 {
            return Err(VaeError::Tiling(format!(
                "tile sizes must be positive (sample {}, latent {})",
                self.tile_sample_min_size, self.tile_latent_min_size
            )));
        }
        Ok(())
    }

    /// Input tiles of `tile`, stepping by `int(tile * (1 - overlap))`; output tiles blended over
    /// `int(out_tile * overlap)` and cropped to `out_tile - blend`. (Python's float arithmetic
    /// and truncating `int()`.)
    fn plan(&self, tile: usize, out_tile: usize) -> Result<TilePlan, VaeError> {
        self.check()?;
        let f = self.tile_overlap_factor;
        let stride = (tile as f64 * (1.0 - f)) as usize;
        let blend = (out_tile as f64 * f) as usize;
        if stride == 0 {
            return Err(VaeError::Tiling(format!(
                "tiles of {tile} with overlap {f} do not advance (int({tile} * (1 - {f})) = 0)"
            )));
        }
        Ok(TilePlan {
            tile,
            stride,
            blend,
            row_limit: out_tile - blend,
        })
    }

    /// Decoding: latent tiles in, image tiles out.
    pub(crate) fn decode_plan(&self) -> Result<TilePlan, VaeError> {
        self.plan(self.tile_latent_min_size, self.tile_sample_min_size)
    }

    /// Encoding: image tiles in, latent (moment) tiles out.
    pub(crate) fn encode_plan(&self) -> Result<TilePlan, VaeError> {
        self.plan(self.tile_sample_min_size, self.tile_latent_min_size)
    }
}

/// The arithmetic of one tiled pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TilePlan {
    /// Input tile side.
    pub tile: usize,
    /// Distance between tile origins, in input pixels.
    pub stride: usize,
    /// Output rows/columns blended with the neighbour.
    pub blend: usize,
    /// Output rows/columns kept from each tile.
    pub row_limit: usize,
}

/// Runs `run` on every tile of `x` and blends the outputs.
///
/// # Shapes
/// `x`: `[batch, channels, height, width]`; `run` maps a tile to `[batch, channels', h', w']`.
pub(crate) fn tiled<B: ZBackend>(
    x: Tensor<B, 4>,
    plan: TilePlan,
    mut run: impl FnMut(Tensor<B, 4>) -> Result<Tensor<B, 4>, VaeError>,
) -> Result<Tensor<B, 4>, VaeError> {
    let [batch, channels, height, width] = x.dims();
    // The blended, uncropped tiles of the previous row: the next row blends with them.
    let mut above: Vec<Tensor<B, 4>> = Vec::new();
    let mut rows = Vec::new();
    for top in (0..height).step_by(plan.stride) {
        let mut row: Vec<Tensor<B, 4>> = Vec::new();
        let mut cropped = Vec::new();
        for (column, left) in (0..width).step_by(plan.stride).enumerate() {
            let input = x.clone().slice([
                0..batch,
                0..channels,
                top..(top + plan.tile).min(height),
                left..(left + plan.tile).min(width),
            ]);
            let mut tile = run(input)?;
            if let Some(a) = above.get(column) {
                tile = blend_v(a, tile, plan.blend);
            }
            if let Some(a) = row.last() {
                tile = blend_h(a, tile, plan.blend);
            }
            let [_, _, h, w] = tile.dims();
            cropped.push(tile.clone().narrow(2, 0, plan.row_limit.min(h)).narrow(
                3,
                0,
                plan.row_limit.min(w),
            ));
            row.push(tile);
        }
        rows.push(Tensor::cat(cropped, 3));
        above = row;
    }
    Ok(Tensor::cat(rows, 2))
}

/// The weights of row `y` of a blend over `extent` rows: `(1 - y / extent, y / extent)`,
/// computed in f64 and rounded to f32 as PyTorch does with Python floats.
fn blend_weights<B: ZBackend>(extent: usize, device: &B::Device) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let ramp = |f: fn(f64) -> f64| -> Tensor<B, 1> {
        let values: Vec<f32> = (0..extent)
            .map(|y| f(y as f64 / extent as f64) as f32)
            .collect();
        Tensor::from_data(TensorData::new(values, [extent]), (device, DType::F32))
    };
    (ramp(|t| 1.0 - t), ramp(|t| t))
}

/// Blends the bottom rows of `a` into the top rows of `b` (diffusers' `blend_v`).
fn blend_v<B: ZBackend>(a: &Tensor<B, 4>, b: Tensor<B, 4>, extent: usize) -> Tensor<B, 4> {
    blend(a, b, extent, 2)
}

/// Blends the right columns of `a` into the left columns of `b` (diffusers' `blend_h`).
fn blend_h<B: ZBackend>(a: &Tensor<B, 4>, b: Tensor<B, 4>, extent: usize) -> Tensor<B, 4> {
    blend(a, b, extent, 3)
}

/// `b[.., i] = a[.., end - extent + i] * (1 - i / extent) + b[.., i] * (i / extent)` along `dim`
/// for `i < extent`, with `extent` clipped to both sides. In f32 whatever the dtype.
fn blend<B: ZBackend>(
    a: &Tensor<B, 4>,
    b: Tensor<B, 4>,
    extent: usize,
    dim: usize,
) -> Tensor<B, 4> {
    let a_len = a.dims()[dim];
    let extent = extent.min(a_len).min(b.dims()[dim]);
    if extent == 0 {
        return b;
    }
    let dtype = b.dtype();
    let (wa, wb) = blend_weights::<B>(extent, &b.device());
    let shape = |w: Tensor<B, 1>| {
        if dim == 2 {
            w.reshape([1, 1, extent, 1])
        } else {
            w.reshape([1, 1, 1, extent])
        }
    };
    let a_edge = a
        .clone()
        .narrow(dim, a_len - extent, extent)
        .cast(DType::F32);
    let b_edge = b.clone().narrow(dim, 0, extent).cast(DType::F32);
    let blended = (a_edge * shape(wa) + b_edge * shape(wb)).cast(dtype);
    let mut ranges = b.dims().map(|d| 0..d);
    ranges[dim] = 0..extent;
    b.slice_assign(ranges, blended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_follow_diffusers_arithmetic() {
        let config = AutoencoderKLConfig::z_image();
        let tiling = config.default_tiling();
        assert_eq!(tiling.tile_latent_min_size, 128);
        // overlap_size = int(128 * 0.75), blend_extent = int(1024 * 0.25), row_limit = 1024 - 256
        assert_eq!(
            tiling.decode_plan().unwrap(),
            TilePlan {
                tile: 128,
                stride: 96,
                blend: 256,
                row_limit: 768
            }
        );
        assert_eq!(
            tiling.encode_plan().unwrap(),
            TilePlan {
                tile: 1024,
                stride: 768,
                blend: 32,
                row_limit: 96
            }
        );
        let odd = TilingConfig {
            tile_sample_min_size: 10,
            tile_latent_min_size: 3,
            tile_overlap_factor: 0.3,
        };
        // int(3 * 0.7) = 2 (2.0999...), int(10 * 0.3) = 3 (3.0000000000000004)
        assert_eq!(odd.decode_plan().unwrap().stride, 2);
        assert_eq!(odd.decode_plan().unwrap().blend, 3);
    }

    #[test]
    fn bad_tilings_are_errors() {
        let config = AutoencoderKLConfig::z_image();
        for tiling in [
            config.default_tiling().with_overlap(1.0),
            config.default_tiling().with_overlap(-0.1),
            config.default_tiling().with_overlap(f64::NAN),
            TilingConfig::for_sample_size(4, &config),
            TilingConfig {
                tile_sample_min_size: 8,
                tile_latent_min_size: 1,
                tile_overlap_factor: 0.25,
            },
        ] {
            assert!(
                matches!(tiling.decode_plan(), Err(VaeError::Tiling(_))),
                "{tiling:?}"
            );
        }
    }
}
