//! Single-precision matrix products for the host kernels, with operands that may be stored in
//! another precision: a weight held in bf16, f16 (or, later, quantized blocks) is widened to f32
//! inside the packing of each block, so no f32 copy of a whole weight matrix ever exists.
//!
//! The blocking is Goto's: for each `NC`-wide column block and `KC`-deep slice, B is packed once
//! into panels of `nr` columns (shared by every thread); blocks of A rows are packed into panels
//! of `mr` rows by the task that uses them; a register-blocked micro-kernel multiplies one A panel
//! by one B panel, the B panel staying in L1 while the A panels of the block stream from L2.
//! [`PackedB`] packs a whole B once for many products (attention reuses a head's keys and values
//! for every query block).
//!
//! Micro-kernels: AVX-512 (14 x 32), AVX2 + FMA (6 x 16) and a portable one (4 x 16, whatever
//! the compiler makes of plain loops), picked at run time. None starts threads of its own inside
//! rayon tasks.

use std::cell::Cell;

use rayon::prelude::*;

/// A read-only f32 matrix in memory: element (i, j) at `ptr + i * rs + j * cs`.
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

/// A matrix whose rows can be read as f32, whatever its storage (see `HostMatrix`).
pub trait RowSource: Sync {
    /// Writes row `i`, columns `c0 .. c0 + out.len()`, as f32 into `out`.
    fn read_row(&self, i: usize, c0: usize, out: &mut [f32]);
}

/// One operand of a product, as the packers read it.
#[derive(Clone, Copy)]
pub enum Operand<'a> {
    /// f32 in memory, any strides.
    Strided(MatRef),
    /// The rows of a stored matrix. As A (`m x k`) they are A's rows; as B (`k x n`) they are B's
    /// columns, so that a PyTorch `nn.Linear` weight (`[out, in]`) is the B of `x W^T` as it is.
    Rows(&'a dyn RowSource),
}

impl From<MatRef> for Operand<'_> {
    fn from(m: MatRef) -> Self {
        Self::Strided(m)
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

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn has_avx2() -> bool {
    false
}

/// Depth of a packed block: one AVX-512 B panel (`KC x 32` f32, 32 KiB) stays in L1. A multiple
/// of 256 so that quantized rows (super-blocks of 256 values) are read whole.
const KC: usize = 256;
/// Columns of B packed at a time: `KC x NC` f32 is 4 MiB, shared by the threads through L3.
const NC: usize = 4096;
/// Micro-kernel row blocks per block of A rows at most (`MC x KC` stays in L2).
const MC_PANELS: usize = 12;

/// A register-blocked micro-kernel and its tile shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// 14 x 32, two zmm accumulators per row.
    Avx512,
    /// 6 x 16, two ymm accumulators per row.
    Avx2,
    /// 4 x 16 in plain Rust.
    Portable,
}

thread_local! {
    /// A kernel forced for this thread (the AVX2 and portable paths timed or tested on a CPU
    /// that has AVX-512).
    static FORCED: Cell<Option<Kernel>> = const { Cell::new(None) };
}

impl Kernel {
    /// The best kernel this CPU runs, unless one is forced on this thread ([`Kernel::force`]) or
    /// by `ZIMAGE_GEMM_KERNEL=avx512|avx2|portable`.
    pub fn detect() -> Self {
        if let Some(kernel) = FORCED.with(Cell::get) {
            return kernel;
        }
        static FROM_ENV: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
        let from_env = *FROM_ENV.get_or_init(|| {
            let name = std::env::var("ZIMAGE_GEMM_KERNEL").ok()?;
            Kernel::from_name(&name)
        });
        from_env.unwrap_or_else(Self::best)
    }

    fn from_name(name: &str) -> Option<Self> {
        let kernel = match name {
            "avx512" => Self::Avx512,
            "avx2" => Self::Avx2,
            "portable" => Self::Portable,
            _ => return None,
        };
        kernel.available().then_some(kernel)
    }

    /// The widest kernel the CPU has.
    pub fn best() -> Self {
        if has_avx512() {
            Self::Avx512
        } else if has_avx2() {
            Self::Avx2
        } else {
            Self::Portable
        }
    }

    /// Whether this CPU can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Self::Avx512 => has_avx512(),
            Self::Avx2 => has_avx2(),
            Self::Portable => true,
        }
    }

    /// Runs `f` with this kernel forced on the current thread: products started on this thread
    /// inside `f` use it (their rayon tasks too).
    pub fn force<R>(self, f: impl FnOnce() -> R) -> R {
        assert!(self.available(), "{self:?} does not run on this CPU");
        let previous = FORCED.with(|k| k.replace(Some(self)));
        let result = f();
        FORCED.with(|k| k.set(previous));
        result
    }

    /// Rows of a micro-tile.
    const fn mr(self) -> usize {
        match self {
            Self::Avx512 => 14,
            Self::Avx2 => 6,
            Self::Portable => 4,
        }
    }

    /// Columns of a micro-tile.
    const fn nr(self) -> usize {
        match self {
            Self::Avx512 => 32,
            Self::Avx2 | Self::Portable => 16,
        }
    }

    /// C[mr x nr] (+)= A panel x B panel, C with row stride `ldc`.
    ///
    /// # Safety
    /// `a` holds `kc * mr` values, `b` `kc * nr` (64-byte aligned), `c` `mr` rows of `nr`.
    unsafe fn run(
        self,
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => avx512_kernel(kc, a, b, c, ldc, acc),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => avx2_kernel(kc, a, b, c, ldc, acc),
            _ => portable_kernel(kc, a, b, c, ldc, acc),
        }
    }
}

/// `C = A B`, or `C += A B` when `accumulate`; A is `m x k`, B `k x n`, C `m x n` row-major with
/// row stride `ldc`.
///
/// # Safety
/// Strided operands must address `m x k` and `k x n` readable elements, row sources must have
/// those sizes, C must address `m` rows of `n` writable values `ldc` apart, and C must not
/// overlap A or B.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: Operand<'_>,
    b: Operand<'_>,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    threads: Threads,
) {
    let kernel = Kernel::detect();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        return zero_unless(accumulate, m, n, c, ldc);
    }
    let (nr, nc) = (kernel.nr(), NC.min(n).next_multiple_of(kernel.nr()));
    let mut b_pack = Packed::new(KC.min(k) * nc);
    for jc in (0..n).step_by(nc) {
        let cols = nc.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let block = &mut b_pack.as_mut_slice()[..kc * cols.next_multiple_of(nr)];
            pack_b_block(kernel, b, pc, kc, jc, cols, block, threads);
            multiply_block(
                kernel,
                m,
                a,
                pc,
                kc,
                block,
                cols,
                SharedMut(c.add(jc)),
                ldc,
                accumulate || pc > 0,
                threads,
            );
        }
    }
}

unsafe fn zero_unless(accumulate: bool, m: usize, n: usize, c: *mut f32, ldc: usize) {
    if !accumulate {
        for i in 0..m {
            std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0);
        }
    }
}

/// B (`k x n`) packed once for several products with [`PackedB::multiply`].
pub struct PackedB {
    k: usize,
    n: usize,
    kernel: Kernel,
    data: Packed,
}

impl PackedB {
    /// # Safety
    /// A strided B must address `k x n` readable elements; a row source must have `n` rows of
    /// `k` values.
    pub unsafe fn new(k: usize, n: usize, b: Operand<'_>, threads: Threads) -> Self {
        let kernel = Kernel::detect();
        let padded = n.next_multiple_of(kernel.nr());
        let mut data = Packed::new(k * padded);
        // The slice at depth pc starts at pc * padded.
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let block = &mut data.as_mut_slice()[pc * padded..(pc + kc) * padded];
            pack_b_block(kernel, b, pc, kc, 0, n, block, threads);
        }
        Self { k, n, kernel, data }
    }

    /// `C = A B` (or `C += A B`), A `m x k`, C `m x n` row-major with row stride `ldc`.
    ///
    /// # Safety
    /// A must address `m x k` readable elements (or have `m` rows of `k`), C `m` rows of `n`
    /// writable ones `ldc` apart, not overlapping A.
    pub unsafe fn multiply(
        &self,
        m: usize,
        a: Operand<'_>,
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
            return zero_unless(accumulate, m, n, c, ldc);
        }
        let padded = n.next_multiple_of(self.kernel.nr());
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let block = &self.data.as_slice()[pc * padded..(pc + kc) * padded];
            multiply_block(
                self.kernel,
                m,
                a,
                pc,
                kc,
                block,
                n,
                SharedMut(c),
                ldc,
                accumulate || pc > 0,
                threads,
            );
        }
    }
}

/// B[pc.., j0..] (`kc x cols`) into panels of `nr` columns (`kc x nr` each, zero beyond `cols`).
#[allow(clippy::too_many_arguments)]
unsafe fn pack_b_block(
    kernel: Kernel,
    b: Operand<'_>,
    pc: usize,
    kc: usize,
    j0: usize,
    cols: usize,
    block: &mut [f32],
    threads: Threads,
) {
    let nr = kernel.nr();
    let pack = |(p, panel): (usize, &mut [f32])| {
        let (jp, width) = (j0 + p * nr, nr.min(cols - p * nr));
        pack_b_panel(b, pc, kc, jp, width, nr, panel)
    };
    let block = &mut block[..kc * cols.next_multiple_of(nr)];
    // Parallel only when there is enough to copy (small products stay on one thread).
    if threads == Threads::Rayon && kc * cols >= 1 << 15 {
        block.par_chunks_mut(kc * nr).enumerate().for_each(pack);
    } else {
        block.chunks_mut(kc * nr).enumerate().for_each(pack);
    }
}

/// One B panel: row p's `nr` values at `p * nr`.
unsafe fn pack_b_panel(
    b: Operand<'_>,
    pc: usize,
    kc: usize,
    j0: usize,
    cols: usize,
    nr: usize,
    panel: &mut [f32],
) {
    match b {
        Operand::Strided(b) if b.cs == 1 => {
            for (p, dst) in panel.chunks_exact_mut(nr).take(kc).enumerate() {
                let src = b.ptr.offset((pc + p) as isize * b.rs + j0 as isize);
                dst[..cols].copy_from_slice(std::slice::from_raw_parts(src, cols));
                dst[cols..].fill(0.0);
            }
        }
        Operand::Strided(b) => {
            // A transposed operand: each column is read along its own contiguous direction.
            for j in 0..nr {
                for p in 0..kc {
                    panel[p * nr + j] = if j < cols { b.at(pc + p, j0 + j) } else { 0.0 };
                }
            }
        }
        Operand::Rows(rows) => {
            let mut column = [0f32; KC];
            for j in 0..nr {
                if j < cols {
                    rows.read_row(j0 + j, pc, &mut column[..kc]);
                    for (p, &v) in column[..kc].iter().enumerate() {
                        panel[p * nr + j] = v;
                    }
                } else {
                    for p in 0..kc {
                        panel[p * nr + j] = 0.0;
                    }
                }
            }
        }
    }
}

/// A[i0.., pc..] (`rows x kc`) into one panel: column p's `mr` values at `p * mr`, zero beyond
/// `rows`.
unsafe fn pack_a_panel(
    a: Operand<'_>,
    i0: usize,
    rows: usize,
    pc: usize,
    kc: usize,
    mr: usize,
    panel: &mut [f32],
) {
    let mut scratch = [0f32; KC];
    for i in 0..mr {
        if i >= rows {
            for p in 0..kc {
                panel[p * mr + i] = 0.0;
            }
            continue;
        }
        let src: &[f32] = match a {
            Operand::Strided(a) if a.cs == 1 => {
                let row = a.ptr.offset((i0 + i) as isize * a.rs + pc as isize);
                std::slice::from_raw_parts(row, kc)
            }
            Operand::Strided(a) => {
                for (p, v) in scratch[..kc].iter_mut().enumerate() {
                    *v = a.at(i0 + i, pc + p);
                }
                &scratch[..kc]
            }
            Operand::Rows(source) => {
                source.read_row(i0 + i, pc, &mut scratch[..kc]);
                &scratch[..kc]
            }
        };
        for (p, &v) in src.iter().enumerate() {
            panel[p * mr + i] = v;
        }
    }
}

/// `C[.., ..cols] (+)= A[.., pc..pc + kc] x block`, the block packed by [`pack_b_block`].
#[allow(clippy::too_many_arguments)]
unsafe fn multiply_block(
    kernel: Kernel,
    m: usize,
    a: Operand<'_>,
    pc: usize,
    kc: usize,
    block: &[f32],
    cols: usize,
    c: SharedMut,
    ldc: usize,
    accumulate: bool,
    threads: Threads,
) {
    let (mr, nr) = (kernel.mr(), kernel.nr());
    let workers = match threads {
        Threads::Single => 1,
        Threads::Rayon => rayon::current_num_threads(),
    };
    // At least two tasks per worker so that uneven ones even out: blocks of rows first, then
    // groups of B panels when there are too few rows (a short prompt, a single timestep).
    let mc = m
        .div_ceil(2 * workers)
        .next_multiple_of(mr)
        .clamp(mr, mr * MC_PANELS);
    let row_blocks = m.div_ceil(mc);
    let panels = cols.div_ceil(nr);
    let groups = (2 * workers).div_ceil(row_blocks).clamp(1, panels);
    let per_group = panels.div_ceil(groups);
    let task = |t: usize| {
        let (ib, g) = (t / groups, t % groups);
        let ic = ib * mc;
        let rows = mc.min(m - ic);
        let panel_range = g * per_group..((g + 1) * per_group).min(panels);
        if panel_range.is_empty() {
            return;
        }
        with_a_scratch(kc * rows.next_multiple_of(mr), |a_pack| {
            for (p, panel) in a_pack.chunks_mut(kc * mr).enumerate() {
                pack_a_panel(a, ic + p * mr, mr.min(rows - p * mr), pc, kc, mr, panel);
            }
            for jp in panel_range.clone() {
                let width = nr.min(cols - jp * nr);
                for ip in 0..rows.div_ceil(mr) {
                    tile(
                        kernel,
                        kc,
                        a_pack.as_ptr().add(ip * kc * mr),
                        block.as_ptr().add(jp * kc * nr),
                        c.at((ic + ip * mr) * ldc + jp * nr),
                        ldc,
                        [mr.min(rows - ip * mr), width],
                        accumulate,
                    );
                }
            }
        });
    };
    let tasks = row_blocks * groups;
    if threads == Threads::Rayon && tasks > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

thread_local! {
    /// Each thread's buffer for packed A panels, reused across products.
    static A_SCRATCH: Cell<Vec<Lane>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on a 64-byte aligned scratch buffer of `len` values (taken out of the thread's slot,
/// so a nested use gets a fresh one instead of a conflict).
fn with_a_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut lanes = A_SCRATCH.with(Cell::take);
    if lanes.len() * 16 < len {
        lanes = vec![Lane([0.0; 16]); len.div_ceil(16)];
    }
    // SAFETY: `Lane` is 16 f32 with no padding.
    let values = unsafe { std::slice::from_raw_parts_mut(lanes.as_mut_ptr().cast::<f32>(), len) };
    let result = f(values);
    A_SCRATCH.with(|slot| slot.set(lanes));
    result
}

/// A destination shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes only its own tiles.
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

    fn as_slice(&self) -> &[f32] {
        // SAFETY: `Lane` is 16 f32 with no padding.
        unsafe { std::slice::from_raw_parts(self.lanes.as_ptr().cast(), self.lanes.len() * 16) }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        let len = self.lanes.len() * 16;
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.lanes.as_mut_ptr().cast(), len) }
    }
}

/// One `rows x cols` tile of C (at most mr x nr); partial tiles go through a scratch tile.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    kernel: Kernel,
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    [rows, cols]: [usize; 2],
    accumulate: bool,
) {
    let (mr, nr) = (kernel.mr(), kernel.nr());
    if rows == mr && cols == nr {
        return kernel.run(kc, a, b, c, ldc, accumulate);
    }
    let mut scratch = [0f32; 14 * 32];
    if accumulate {
        for i in 0..rows {
            for j in 0..cols {
                scratch[i * nr + j] = *c.add(i * ldc + j);
            }
        }
    }
    kernel.run(kc, a, b, scratch.as_mut_ptr(), nr, accumulate);
    for i in 0..rows {
        for j in 0..cols {
            *c.add(i * ldc + j) = scratch[i * nr + j];
        }
    }
}

/// C[14 x 32] (+)= A panel x B panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    const MR: usize = Kernel::Avx512.mr();
    const NR: usize = Kernel::Avx512.nr();
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

/// C[6 x 16] (+)= A panel x B panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    const MR: usize = Kernel::Avx2.mr();
    const NR: usize = Kernel::Avx2.nr();
    let mut lo = [_mm256_setzero_ps(); MR];
    let mut hi = [_mm256_setzero_ps(); MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..kc {
        let b0 = _mm256_load_ps(b);
        let b1 = _mm256_load_ps(b.add(8));
        for i in 0..MR {
            let ai = _mm256_broadcast_ss(&*a.add(i));
            lo[i] = _mm256_fmadd_ps(ai, b0, lo[i]);
            hi[i] = _mm256_fmadd_ps(ai, b1, hi[i]);
        }
        a = a.add(MR);
        b = b.add(NR);
    }
    for i in 0..MR {
        let row = c.add(i * ldc);
        if accumulate {
            lo[i] = _mm256_add_ps(lo[i], _mm256_loadu_ps(row));
            hi[i] = _mm256_add_ps(hi[i], _mm256_loadu_ps(row.add(8)));
        }
        _mm256_storeu_ps(row, lo[i]);
        _mm256_storeu_ps(row.add(8), hi[i]);
    }
}

/// C[4 x 16] (+)= A panel x B panel, in plain Rust (any CPU).
unsafe fn portable_kernel(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    const MR: usize = Kernel::Portable.mr();
    const NR: usize = Kernel::Portable.nr();
    let mut acc = [[0f32; NR]; MR];
    let a = std::slice::from_raw_parts(a, kc * MR);
    let b = std::slice::from_raw_parts(b, kc * NR);
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for (row, &ai) in acc.iter_mut().zip(ap) {
            for (v, &bj) in row.iter_mut().zip(bp) {
                *v = ai.mul_add(bj, *v);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let dst = std::slice::from_raw_parts_mut(c.add(i * ldc), NR);
        for (d, &v) in dst.iter_mut().zip(row) {
            *d = if accumulate { *d + v } else { v };
        }
    }
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

    /// Rows stored as they come, read through the row interface (as a stored weight is).
    struct Rows {
        values: Vec<f32>,
        cols: usize,
    }

    impl RowSource for Rows {
        fn read_row(&self, i: usize, c0: usize, out: &mut [f32]) {
            let start = i * self.cols + c0;
            out.copy_from_slice(&self.values[start..start + out.len()]);
        }
    }

    /// Sizes around every block edge (mr, nr, KC, MC, NC), every operand form (strided A, row
    /// source A; row-major, transposed and row-source B), accumulation, both threading modes,
    /// the whole-B packing, and every kernel this CPU runs, against an f64 product.
    #[test]
    fn matches_a_plain_product() {
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        let kernels: Vec<Kernel> = [Kernel::Avx512, Kernel::Avx2, Kernel::Portable]
            .into_iter()
            .filter(|k| k.available())
            .collect();
        for (m, k, n) in [
            (1, 3, 5),
            (14, 256, 32),
            (15, 257, 33),
            (29, 300, 70),
            (200, 513, 300),
            (13, 64, 64),
            (3, 0, 4),
            (2, 40, 4200),
            (7, 600, 4097),
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
            let a_rows = Rows {
                values: (0..m * k)
                    .map(|i| a_data[(i / k.max(1)) * (k + 2) + i % k.max(1)])
                    .collect(),
                cols: k,
            };
            let transposed = MatRef {
                ptr: bt_data.as_ptr(),
                rs: 1,
                cs: k as isize,
            };
            let b_rows = Rows {
                values: bt_data.clone(),
                cols: k,
            };
            let expected = reference(m, k, n, a, MatRef::row_major(&b_data, n));
            let b_forms = [
                Operand::Strided(MatRef::row_major(&b_data, n)),
                Operand::Strided(transposed),
                Operand::Rows(&b_rows),
            ];
            let a_forms = [Operand::Strided(a), Operand::Rows(&a_rows)];
            for &kernel in &kernels {
                for (bi, &b) in b_forms.iter().enumerate() {
                    for (ai, &a) in a_forms.iter().enumerate() {
                        for (accumulate, threads) in
                            [(false, Threads::Rayon), (true, Threads::Single)]
                        {
                            let mut c = vec![0.5f32; m * (n + 3)];
                            let mut packed = c.clone();
                            kernel.force(|| unsafe {
                                // SAFETY: the buffers have the sizes stated; C rows are n + 3 apart.
                                gemm(m, k, n, a, b, c.as_mut_ptr(), n + 3, accumulate, threads);
                                PackedB::new(k, n, b, threads).multiply(
                                    m,
                                    a,
                                    packed.as_mut_ptr(),
                                    n + 3,
                                    accumulate,
                                    threads,
                                );
                            });
                            for i in 0..m {
                                for j in 0..n + 3 {
                                    let want = if j >= n {
                                        0.5
                                    } else {
                                        expected[i * n + j] + if accumulate { 0.5 } else { 0.0 }
                                    };
                                    for (what, got) in [
                                        ("gemm", c[i * (n + 3) + j]),
                                        ("packed", packed[i * (n + 3) + j]),
                                    ] {
                                        let got = got as f64;
                                        assert!(
                                            (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                                            "{what} {kernel:?} A{ai} B{bi} {m}x{k}x{n} ({i}, {j}) accumulate {accumulate}: {got} vs {want}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
