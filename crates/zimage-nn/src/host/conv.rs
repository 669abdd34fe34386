//! `nn.Conv2d` on the host: im2col in bands plus a matrix product.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::gemm::{sgemm, MatRef, Threads};
use super::{from_f32, host_f32};

/// Elements of one band's im2col buffer (4 MiB): large enough for an efficient matrix product,
/// small enough to stay in cache and not to add memory at high resolution.
const BAND_ELEMENTS: usize = 1 << 20;

/// `nn.Conv2d` with symmetric zero padding, as im2col + matrix product over bands of output rows.
/// burn-ndarray's conv2d is a direct convolution, several times slower on large images.
///
/// # Shapes
/// x `[batch, in, h, w]`, weight `[out, in, k, k]`, bias `[out]` -> `[batch, out, h', w']`
pub fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Tensor<B, 1>,
    stride: usize,
    padding: usize,
) -> Tensor<B, 4> {
    let device = x.device();
    let dtype = x.dtype();
    let [batch, cin, h, w] = x.dims();
    let [cout, _, k, _] = weight.dims();
    let ho = (h + 2 * padding - k) / stride + 1;
    let wo = (w + 2 * padding - k) / stride + 1;
    let (x, weight, bias) = (host_f32(x), host_f32(weight), host_f32(bias));
    let depth = cin * k * k;
    let plane = ho * wo;
    let mut out = vec![0f32; batch * cout * plane];
    let band_rows = (BAND_ELEMENTS / (depth * wo)).clamp(1, ho);
    let mut col = vec![0f32; depth * band_rows * wo];
    for n in 0..batch {
        let image = &x[n * cin * h * w..(n + 1) * cin * h * w];
        let out_n = &mut out[n * cout * plane..(n + 1) * cout * plane];
        for r0 in (0..ho).step_by(band_rows) {
            let rows = band_rows.min(ho - r0);
            let cols = rows * wo;
            // col[(c, ky, kx), (r, ox)] = x[c, r * stride + ky - padding, ox * stride + kx - padding]
            col[..depth * cols]
                .par_chunks_mut(k * k * cols)
                .enumerate()
                .for_each(|(c, block)| {
                    let channel = &image[c * h * w..(c + 1) * h * w];
                    for (i, dst) in block.chunks_mut(cols).enumerate() {
                        let (ky, kx) = (i / k, i % k);
                        im2col_row(
                            channel,
                            dst,
                            [h, w],
                            [r0, rows, wo],
                            [ky, kx],
                            stride,
                            padding,
                        );
                    }
                });
            // out[:, r0 * wo ..][.. cols] = weight [cout, depth] x col [depth, cols]
            // SAFETY: weight is `cout x depth`, col `depth x cols`, and the destination `cout`
            // rows of `cols` values, `plane` apart, starting at column r0 * wo of `out_n`.
            unsafe {
                sgemm(
                    cout,
                    depth,
                    cols,
                    MatRef::row_major(&weight, depth),
                    MatRef::row_major(&col[..depth * cols], cols),
                    out_n.as_mut_ptr().add(r0 * wo),
                    plane,
                    false,
                    Threads::Rayon,
                );
            }
        }
    }
    out.par_chunks_mut(plane)
        .enumerate()
        .for_each(|(i, p)| p.iter_mut().for_each(|v| *v += bias[i % cout]));
    from_f32(out, [batch, cout, ho, wo], &device, dtype)
}

/// One im2col row: kernel offset (ky, kx) of one channel for `rows` output rows from `r0`;
/// `dst` holds `rows * wo` values, zero where the kernel reads padding.
fn im2col_row(
    channel: &[f32],
    dst: &mut [f32],
    [h, w]: [usize; 2],
    [r0, rows, wo]: [usize; 3],
    [ky, kx]: [usize; 2],
    stride: usize,
    padding: usize,
) {
    // Output columns whose input column ox * stride + kx - padding lies in [0, w).
    let lo = padding.saturating_sub(kx).div_ceil(stride).min(wo);
    let hi = if w + padding > kx {
        ((w + padding - kx - 1) / stride + 1).min(wo)
    } else {
        0
    };
    for (r, d) in dst.chunks_mut(wo).take(rows).enumerate() {
        let iy = ((r0 + r) * stride + ky) as isize - padding as isize;
        if iy < 0 || iy >= h as isize || lo >= hi {
            d.fill(0.0);
            continue;
        }
        let src = &channel[iy as usize * w..(iy as usize + 1) * w];
        d[..lo].fill(0.0);
        d[hi..].fill(0.0);
        let ix0 = lo * stride + kx - padding;
        if stride == 1 {
            d[lo..hi].copy_from_slice(&src[ix0..ix0 + (hi - lo)]);
        } else {
            for (j, v) in d[lo..hi].iter_mut().enumerate() {
                *v = src[ix0 + j * stride];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::NdArray;
    use burn::tensor::module::conv2d as burn_conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::Distribution;

    use super::*;

    type B = NdArray<f32>;

    /// Against burn's own conv2d, for the kernel/stride/padding combinations the VAE uses and
    /// sizes where the kernel reaches past both borders.
    #[test]
    fn conv2d_matches_burn() {
        let device = Default::default();
        for (k, stride, padding) in [(3, 1, 1), (3, 2, 0), (1, 1, 0), (3, 1, 0), (3, 2, 1)] {
            for (h, w) in [(7, 5), (1, 4), (6, 9), (2, 3)] {
                if h + 2 * padding < k || w + 2 * padding < k {
                    continue;
                }
                let x =
                    Tensor::<B, 4>::random([2, 3, h, w], Distribution::Normal(0.0, 1.0), &device);
                let weight =
                    Tensor::<B, 4>::random([4, 3, k, k], Distribution::Normal(0.0, 1.0), &device);
                let bias = Tensor::<B, 1>::random([4], Distribution::Normal(0.0, 1.0), &device);
                let expected = burn_conv2d(
                    x.clone(),
                    weight.clone(),
                    Some(bias.clone()),
                    ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1),
                );
                let actual = conv2d(x, weight, bias, stride, padding);
                assert_eq!(
                    actual.dims(),
                    expected.dims(),
                    "k{k} s{stride} p{padding} {h}x{w}"
                );
                let diff = (actual - expected).abs().max().into_scalar();
                assert!(diff < 1e-5, "k{k} s{stride} p{padding} {h}x{w}: {diff}");
            }
        }
    }
}
