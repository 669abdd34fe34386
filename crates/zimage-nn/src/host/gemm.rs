//! Single-precision matrix products for the host kernels: a packed AVX-512 kernel where the CPU
//! has one (on par with MKL single-threaded on the Xeon of docs/benchmarks.md), matrixmultiply
//! elsewhere. Unlike matrixmultiply it never starts threads of its own inside rayon tasks, and
//! B can be packed once and reused ([`PackedB`]).
//!
//! The blocking is Goto's: B is packed into panels of `NR` columns, `KC` rows deep; a block of
//! `MC` rows of A into panels of `MR` rows; a register-blocked micro-kernel multiplies one A panel
//! by one B panel, B's panel staying in L1 while the A panels of the block stream from L2.
//! Attention multiplies every query block of a head by the same packed keys and values.

use rayon::prelude::*;

/// A read-only matrix: element (i, j) at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a MatRef is only read, and callers keep the memory alive for the product.
unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}

impl MatRef {
    /// A dense row-major matrix with `cols` columns.
    pub fn row_major(data: &[f32], cols: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// # Safety
    /// (i, j) must lie inside the matrix's memory.
    unsafe fn at(self, i: usize, j: usize) -> f32 {
        *self.ptr.offset(i as isize * self.rs + j as isize * self.cs)
    }
}

/// Whether the work is split over rayon's threads (`Single` inside tasks that already are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    Single,
    Rayon,
}

/// Whether the CPU runs the AVX-512 kernels (checked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn has_avx512() -> bool {
    false
}

/// Rows of C per micro-kernel: 2 x MR accumulators plus two B vectors fit the 32 registers.
const MR: usize = 14;
/// Columns of C per micro-kernel: two 16-lane vectors.
const NR: usize = 32;
/// Depth of a packed block: one B panel (`KC x NR`, 32 KiB) stays in L1.
const KC: usize = 256;
/// Rows of A per block at most (`MC x KC`, 168 KiB, stays in L2).
const MC: usize = MR * 12;

/// `C = A B`, or `C += A B` when `accumulate`; A is `m x k`, B `k x n`, C `m x n` row-major with
/// row stride `ldc`.
///
/// # Safety
/// A and B must address `m x k` and `k x n` readable elements, C `m` rows of `n` writable ones
/// `ldc` apart, and C must not overlap A or B.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: MatRef,
    b: MatRef,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    threads: Threads,
) {
    if m == 0 || n == 0 {
        return;
    }
    let b = PackedB::new(k, n, b, threads);
    b.multiply(m, a, c, ldc, accumulate, threads);
}

/// Which kernel a packing is for: the AVX-512 one, or matrixmultiply on a row-major copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Avx512,
    Portable,
}

impl Kernel {
    fn detect() -> Self {
        if has_avx512() {
            Self::Avx512
        } else {
            Self::Portable
        }
    }
}

/// B (`k x n`) packed for [`PackedB::multiply`]: `KC`-deep blocks of `NR`-column panels, zero
/// beyond `n`; a plain row-major copy where the AVX-512 kernel does not run.
pub struct PackedB {
    k: usize,
    n: usize,
    kernel: Kernel,
    data: Packed,
}

impl PackedB {
    /// # Safety
    /// B must address `k x n` readable elements.
    pub unsafe fn new(k: usize, n: usize, b: MatRef, threads: Threads) -> Self {
        Self::for_kernel(k, n, b, threads, Kernel::detect())
    }

    unsafe fn for_kernel(k: usize, n: usize, b: MatRef, threads: Threads, kernel: Kernel) -> Self {
        if kernel == Kernel::Portable {
            let mut data = Packed::new(k * n);
            let dst = data.as_mut_slice();
            for i in 0..k {
                for j in 0..n {
                    dst[i * n + j] = b.at(i, j);
                }
            }
            return Self { k, n, kernel, data };
        }
        let panels = n.div_ceil(NR);
        let mut data = Packed::new(k * panels * NR);
        // The block at depth pc starts at pc * panels * NR; its panel jp at + jp * kc * NR.
        let mut blocks = Vec::new();
        let mut rest = &mut data.as_mut_slice()[..k * panels * NR];
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let (block, tail) = rest.split_at_mut(kc * panels * NR);
            blocks.extend(
                block
                    .chunks_mut(kc * NR)
                    .enumerate()
                    .map(|(jp, p)| (pc, jp, p)),
            );
            rest = tail;
        }
        let pack = |(pc, jp, panel): (usize, usize, &mut [f32])| {
            pack_b(b, pc, panel.len() / NR, jp * NR, NR.min(n - jp * NR), panel)
        };
        match threads {
            Threads::Rayon => blocks.into_par_iter().for_each(pack),
            Threads::Single => blocks.into_iter().for_each(pack),
        }
        Self { k, n, kernel, data }
    }

    /// `C = A B` (or `C += A B`), A `m x k`, C `m x n` row-major with row stride `ldc`.
    ///
    /// # Safety
    /// A must address `m x k` readable elements, C `m` rows of `n` writable ones `ldc` apart, not
    /// overlapping A.
    pub unsafe fn multiply(
        &self,
        m: usize,
        a: MatRef,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
        threads: Threads,
    ) {
        let (k, n) = (self.k, self.n);
        if m == 0 || n == 0 {
            return;
        }
        if k == 0 {
            if !accumulate {
                for i in 0..m {
                    std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0);
                }
            }
            return;
        }
        if self.kernel == Kernel::Portable {
            let b = self.data.as_ptr();
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.ptr,
                a.rs,
                a.cs,
                b,
                n as isize,
                1,
                if accumulate { 1.0 } else { 0.0 },
                c,
                ldc as isize,
                1,
            );
            return;
        }
        let workers = match threads {
            Threads::Single => 1,
            Threads::Rayon => rayon::current_num_threads(),
        };
        // At least two blocks of rows per worker, so that uneven blocks even out.
        let mc = m.div_ceil(2 * workers).next_multiple_of(MR).clamp(MR, MC);
        let c = SharedMut(c);
        let block = |ic: usize| {
            let rows = mc.min(m - ic);
            let mut a_pack = Packed::new(KC.min(k) * rows.next_multiple_of(MR));
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let a_pack = &mut a_pack.as_mut_slice()[..kc * rows.next_multiple_of(MR)];
                for (p, panel) in a_pack.chunks_mut(kc * MR).enumerate() {
                    pack_a(a, ic + p * MR, MR.min(rows - p * MR), pc, kc, panel);
                }
                let panels = n.div_ceil(NR);
                let b_block = self.data.as_ptr().add(pc * panels * NR);
                for jp in 0..panels {
                    let cols = NR.min(n - jp * NR);
                    for ip in 0..rows.div_ceil(MR) {
                        tile(
                            kc,
                            a_pack.as_ptr().add(ip * kc * MR),
                            b_block.add(jp * kc * NR),
                            c.at((ic + ip * MR) * ldc + jp * NR),
                            ldc,
                            [MR.min(rows - ip * MR), cols],
                            accumulate || pc > 0,
                        );
                    }
                }
            }
        };
        let starts: Vec<usize> = (0..m).step_by(mc).collect();
        match threads {
            Threads::Rayon if starts.len() > 1 => starts.into_par_iter().for_each(block),
            _ => starts.into_iter().for_each(block),
        }
    }
}

/// A destination shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes only its own rows.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// # Safety
    /// `offset` must lie inside the destination.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

/// An f32 buffer aligned to a cache line, for the packed panels.
struct Packed {
    lanes: Vec<Lane>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Lane([f32; 16]);

impl Packed {
    fn new(len: usize) -> Self {
        Self {
            lanes: vec![Lane([0.0; 16]); len.div_ceil(16)],
        }
    }

    fn as_ptr(&self) -> *const f32 {
        self.lanes.as_ptr().cast()
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        let len = self.lanes.len() * 16;
        // SAFETY: `Lane` is 16 f32 with no padding.
        unsafe { std::slice::from_raw_parts_mut(self.lanes.as_mut_ptr().cast(), len) }
    }
}

/// B[pc.., j0..] (`kc x cols`) into one panel: row p's NR values at `p * NR`, zero beyond `cols`.
unsafe fn pack_b(b: MatRef, pc: usize, kc: usize, j0: usize, cols: usize, panel: &mut [f32]) {
    if b.cs == 1 {
        for (p, dst) in panel.chunks_exact_mut(NR).take(kc).enumerate() {
            let src = b.ptr.offset((pc + p) as isize * b.rs + j0 as isize);
            dst[..cols].copy_from_slice(std::slice::from_raw_parts(src, cols));
            dst[cols..].fill(0.0);
        }
        return;
    }
    // Column-major source (a transposed operand): read each column contiguously.
    for j in 0..NR {
        for p in 0..kc {
            panel[p * NR + j] = if j < cols { b.at(pc + p, j0 + j) } else { 0.0 };
        }
    }
}

/// A[i0.., pc..] (`rows x kc`) into one panel: column p's MR values at `p * MR`, zero beyond
/// `rows`.
unsafe fn pack_a(a: MatRef, i0: usize, rows: usize, pc: usize, kc: usize, panel: &mut [f32]) {
    for i in 0..MR {
        if i < rows {
            let row = a.ptr.offset((i0 + i) as isize * a.rs + pc as isize * a.cs);
            if a.cs == 1 {
                let src = std::slice::from_raw_parts(row, kc);
                for (p, &v) in src.iter().enumerate() {
                    panel[p * MR + i] = v;
                }
            } else {
                for p in 0..kc {
                    panel[p * MR + i] = *row.offset(p as isize * a.cs);
                }
            }
        } else {
            for p in 0..kc {
                panel[p * MR + i] = 0.0;
            }
        }
    }
}

/// One `rows x cols` tile of C (at most MR x NR); partial tiles go through a scratch tile.
unsafe fn tile(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    [rows, cols]: [usize; 2],
    accumulate: bool,
) {
    if rows == MR && cols == NR {
        return kernel(kc, a, b, c, ldc, accumulate);
    }
    let mut scratch = [0f32; MR * NR];
    if accumulate {
        for i in 0..rows {
            for j in 0..cols {
                scratch[i * NR + j] = *c.add(i * ldc + j);
            }
        }
    }
    kernel(kc, a, b, scratch.as_mut_ptr(), NR, accumulate);
    for i in 0..rows {
        for j in 0..cols {
            *c.add(i * ldc + j) = scratch[i * NR + j];
        }
    }
}

/// C[MR x NR] (+)= A panel x B panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    let mut lo = [_mm512_setzero_ps(); MR];
    let mut hi = [_mm512_setzero_ps(); MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0 = _mm512_load_ps(b);
        let b1 = _mm512_load_ps(b.add(16));
        for i in 0..MR {
            let ai = _mm512_set1_ps(*a.add(i));
            lo[i] = _mm512_fmadd_ps(ai, b0, lo[i]);
            hi[i] = _mm512_fmadd_ps(ai, b1, hi[i]);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    for i in 0..MR {
        let row = c.add(i * ldc);
        if accumulate {
            lo[i] = _mm512_add_ps(lo[i], _mm512_loadu_ps(row));
            hi[i] = _mm512_add_ps(hi[i], _mm512_loadu_ps(row.add(16)));
        }
        _mm512_storeu_ps(row, lo[i]);
        _mm512_storeu_ps(row.add(16), hi[i]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: usize, _: *const f32, _: *const f32, _: *mut f32, _: usize, _: bool) {
    unreachable!("the packed kernel runs only where has_avx512()")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: usize, k: usize, n: usize, a: MatRef, b: MatRef) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                // SAFETY: i < m, j < n, p < k.
                c[i * n + j] = (0..k)
                    .map(|p| unsafe { a.at(i, p) as f64 * b.at(p, j) as f64 })
                    .sum();
            }
        }
        c
    }

    /// Sizes around every block edge (MR, NR, KC, MC), both layouts of B, a strided A,
    /// accumulation, both threading modes, and the portable kernel beside the detected one,
    /// against an f64 product.
    #[test]
    fn matches_a_plain_product() {
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        for (m, k, n) in [
            (1, 3, 5),
            (14, 256, 32),
            (15, 257, 33),
            (29, 300, 70),
            (200, 513, 300),
            (13, 64, 64),
            (3, 0, 4),
        ] {
            // A with a row stride of k + 2.
            let a_data: Vec<f32> = (0..m * (k + 2)).map(value).collect();
            let b_data: Vec<f32> = (0..k * n).map(|i| value(i + 3)).collect();
            let bt_data: Vec<f32> = (0..n * k).map(|i| b_data[(i % k) * n + i / k]).collect();
            let a = MatRef {
                ptr: a_data.as_ptr(),
                rs: (k + 2) as isize,
                cs: 1,
            };
            let transposed = MatRef {
                ptr: bt_data.as_ptr(),
                rs: 1,
                cs: k as isize,
            };
            for b in [MatRef::row_major(&b_data, n), transposed] {
                let expected = reference(m, k, n, a, b);
                for (accumulate, threads) in [(false, Threads::Rayon), (true, Threads::Single)] {
                    let mut c = vec![0.5f32; m * (n + 3)];
                    // SAFETY: the buffers have the sizes stated; C rows are n + 3 apart.
                    unsafe { sgemm(m, k, n, a, b, c.as_mut_ptr(), n + 3, accumulate, threads) };
                    let portable =
                        unsafe { PackedB::for_kernel(k, n, b, threads, Kernel::Portable) };
                    let mut again = c.clone();
                    // SAFETY: as above; C is rewritten (not accumulated) by the other kernel.
                    unsafe { portable.multiply(m, a, again.as_mut_ptr(), n + 3, false, threads) };
                    for i in 0..m {
                        for j in 0..n + 3 {
                            let got = c[i * (n + 3) + j] as f64;
                            let (want, fresh) = if j >= n {
                                (0.5, 0.5)
                            } else {
                                let e = expected[i * n + j];
                                (e + if accumulate { 0.5 } else { 0.0 }, e)
                            };
                            let close = |x: f64, y: f64| (x - y).abs() < 1e-4 * (1.0 + y.abs());
                            assert!(
                                close(got, want),
                                "{m}x{k}x{n} ({i}, {j}) accumulate {accumulate}: {got} vs {want}"
                            );
                            let again = again[i * (n + 3) + j] as f64;
                            assert!(
                                close(again, fresh),
                                "{m}x{k}x{n} packed: {again} vs {fresh}"
                            );
                        }
                    }
                }
            }
        }
    }
}
