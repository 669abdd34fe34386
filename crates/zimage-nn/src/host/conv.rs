//! `nn.Conv2d` on the host: im2col in bands plus a matrix product.

use rayon::prelude::*;

use super::gemm::{gemm, Operand, Threads};

/// Elements of one band's im2col buffer (4 MiB): large enough for an efficient matrix product,
/// small enough to stay in cache and not to add memory at high resolution.
const BAND_ELEMENTS: usize = 1 << 20;

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
pub struct ConvShape {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    /// Output height and width.
    pub fn output(&self) -> [usize; 2] {
        let out = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        [out(self.height), out(self.width)]
    }
}

/// `nn.Conv2d` with symmetric zero padding, as im2col + matrix product over bands of output rows
/// (burn-ndarray's conv2d is a direct convolution, several times slower on large images).
/// `weight` is `[out, in * k * k]` (PyTorch's `[out, in, k, k]` flattened), in any stored form.
///
/// # Shapes
/// x `[batch, in, h, w]`, bias `[out]` -> `[batch, out, h', w']`
pub fn conv2d(x: &[f32], shape: ConvShape, weight: Operand<'_>, bias: &[f32]) -> Vec<f32> {
    let ConvShape {
        batch,
        in_channels: cin,
        height: h,
        width: w,
        out_channels: cout,
        kernel: k,
        stride,
        padding,
    } = shape;
    let [ho, wo] = shape.output();
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
                gemm(
                    cout,
                    depth,
                    cols,
                    weight,
                    Operand::Strided(super::gemm::MatRef::row_major(&col[..depth * cols], cols)),
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
    out
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
