//! Matrix multiply, the one product entry: C (+)= op(A) · op(B), row-major, with typed
//! operands ([`Operand`], [`Accumulate`], [`Fused`]; [`Strided`] for views into larger
//! buffers). f32 products run on quill's own kernel ([`super::sgemm`]) where the CPU has
//! AVX-512 or AVX2 + FMA, and on the `gemm` crate's plain path elsewhere; bf16 operands on
//! [`super::packed`] where the CPU has `vdpbf16ps` (or no AVX2), else rounded to bf16 and
//! multiplied by the f32 product ([`rounded_f32`]). The kernels below this file import none of
//! each other (their shared types are in [`super::product`]).

use super::bf16::has_bf16;
pub use super::bf16::{round_in_place, round_row};
pub use super::product::Accumulate;
use super::product::{Dims, Fusion, Strided, View, ViewMut};
use gemm::Parallelism;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Calls into the `gemm` crate in progress, on any thread.
pub static GEMM_CALLS_ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Problems smaller than this many multiply-adds run on one thread: a second thread
/// costs more than it brings (../shared/notes/cpu-matmul.md).
const PARALLEL_MIN_MACS: usize = 1 << 17;

pub(crate) fn parallelism(m: usize, k: usize, n: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && m * k * n >= PARALLEL_MIN_MACS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// The precision of a training product's operands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 operands.
    #[default]
    F32,
    /// Operands rounded to bf16, products accumulated in f32 (`kernels::bf16`).
    Bf16,
}

impl Precision {
    /// From a `--dtype` value: f32 or bf16.
    pub fn parse(s: &str) -> Option<Precision> {
        match s {
            "f32" => Some(Precision::F32),
            "bf16" => Some(Precision::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Whether a product reads an operand as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transpose {
    No,
    Yes,
}

/// A dense row-major operand of a product: `data` holds `rows` x `cols` as stored, and the
/// product reads it as stored or transposed.
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub transpose: Transpose,
    /// Every value is a bf16 number already (see [`Operand::rounded`]).
    pub rounded: bool,
}

impl<'a> Operand<'a> {
    /// `data` as a rows x cols matrix, read as stored.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(
            data.len() >= rows * cols,
            "operand smaller than {rows} x {cols}"
        );
        Operand {
            data,
            rows,
            cols,
            transpose: Transpose::No,
            rounded: false,
        }
    }

    /// The same operand, marked as holding bf16 numbers only (the caller rounded it, e.g.
    /// [`super::crossentropy::forward_backward_inplace`]'s gradients): a bf16 product that
    /// rounds its operands into f32 copies ([`rounded_f32`]) reads it in place instead. Only
    /// a speed hint: rounding a bf16 number changes nothing, so every kernel gives the same
    /// result for it either way.
    pub fn rounded(self) -> Self {
        Operand {
            rounded: true,
            ..self
        }
    }

    /// An operand the product reads as rows x cols, stored that way or, when `transposed`,
    /// stored cols x rows.
    pub fn op(data: &'a [f32], rows: usize, cols: usize, transposed: bool) -> Self {
        match transposed {
            false => Operand::new(data, rows, cols),
            true => Operand::new(data, cols, rows).t(),
        }
    }

    /// The same matrix, read transposed.
    pub fn t(self) -> Self {
        let transpose = match self.transpose {
            Transpose::No => Transpose::Yes,
            Transpose::Yes => Transpose::No,
        };
        Operand { transpose, ..self }
    }

    /// Rows and columns as the product reads it.
    pub fn shape(&self) -> (usize, usize) {
        match self.transpose {
            Transpose::No => (self.rows, self.cols),
            Transpose::Yes => (self.cols, self.rows),
        }
    }

    fn view(&self) -> View {
        let (rs, cs) = match self.transpose {
            Transpose::No => (self.cols, 1),
            Transpose::Yes => (1, self.cols),
        };
        View {
            ptr: self.data.as_ptr(),
            rs,
            cs,
        }
    }
}

/// Work fused into a product, so it needs no pass of its own over memory: inside quill's
/// kernels (bf16, and f32 with AVX-512 or AVX2) the starting values go into the tile stores and the
/// column sums are taken while B is packed; on the `gemm` crate's path the same work runs as
/// passes around the call.
#[derive(Default)]
pub struct Fused<'a> {
    /// C starts as bias[j] on every row (instead of its old value).
    pub bias: Option<&'a [f32]>,
    /// C also starts with residual [m, n] added.
    pub residual: Option<&'a [f32]>,
    /// col_sums[j] += Σ over k of op(b)[k, j] (a bias gradient when B is the output
    /// gradient), in k order.
    pub col_sums: Option<&'a mut [f32]>,
}

/// c [m, n] (+)= op(a) [m, k] · op(b) [k, n], with operands in the given precision (f32
/// accumulation and output either way).
pub fn matmul(precision: Precision, c: &mut [f32], a: Operand, b: Operand, acc: Accumulate) {
    matmul_fused(precision, c, a, b, acc, Fused::default())
}

/// [`matmul`] with work fused into it (see [`Fused`]). A starting value (bias or residual)
/// excludes accumulation.
pub fn matmul_fused(
    precision: Precision,
    c: &mut [f32],
    a: Operand,
    b: Operand,
    acc: Accumulate,
    fused: Fused,
) {
    let ((m, k), (kb, n)) = (a.shape(), b.shape());
    assert!(k == kb, "inner sizes differ: {k} and {kb}");
    assert!(c.len() >= m * n);
    let init = fused.bias.is_some() || fused.residual.is_some();
    assert!(
        !(init && acc == Accumulate::Add),
        "a starting value and accumulation exclude each other"
    );
    if let Some(r) = fused.residual {
        assert!(r.len() >= m * n);
    }
    if let Some(bias) = fused.bias {
        assert!(bias.len() >= n);
    }
    if let Some(s) = &fused.col_sums {
        assert!(s.len() >= n);
    }
    let dims = Dims { m, k, n };
    let c_view = ViewMut {
        ptr: c.as_mut_ptr(),
        rs: n,
    };
    let quill_kernel = precision == Precision::Bf16 || super::sgemm::available();
    if quill_kernel {
        let fusion = Fusion {
            bias: fused.bias,
            residual: fused.residual.map(|r| (r.as_ptr(), n)),
            col_sums: fused.col_sums.map(|s| s.as_mut_ptr()),
            round_b: false,
            round_a: false,
            b_half: None,
            a_bf16: false,
        };
        let s = Strided {
            dims,
            c: c_view,
            a: a.view(),
            b: b.view(),
            accumulate: acc,
            parallel: true,
            fusion,
        };
        let ready = (a.rounded, b.rounded);
        // Safety: the asserts above bound every index the views reach.
        return unsafe {
            match precision == Precision::Bf16 && bf16_is_rounded_f32() {
                true => rounded_f32(s, ready),
                false => matmul_strided(precision, s),
            }
        };
    }
    // the `gemm` crate's path: the fused work as passes around the product
    let c = &mut c[..m * n];
    if init {
        super::init_rows(c, fused.bias, fused.residual.map(|r| &r[..m * n]), n);
    }
    if let Some(sums) = fused.col_sums {
        match b.transpose {
            Transpose::Yes => {
                for (j, s) in sums[..n].iter_mut().enumerate() {
                    *s += b.data[j * k..(j + 1) * k]
                        .iter()
                        .fold(0.0, |acc, &x| acc + x);
                }
            }
            Transpose::No => super::reduce::col_sum_acc(&mut sums[..n], b.data, k),
        }
    }
    let s = Strided {
        dims,
        c: c_view,
        a: a.view(),
        b: b.view(),
        accumulate: if init { Accumulate::Add } else { acc },
        parallel: true,
        fusion: Fusion::default(),
    };
    // Safety: as above.
    unsafe { matmul_strided(precision, s) }
}

/// The strided form, for views into larger buffers (attention heads inside a qkv matrix):
/// bf16 operands on [`super::packed`], f32 on [`super::sgemm`] where the CPU has AVX-512 or
/// AVX2 and on the `gemm` crate elsewhere (which takes no fused work).
///
/// # Safety
/// Every element reached through the views lies inside live allocations, `c`'s elements are
/// written by nobody else during the call, and the fused work's buffers fit the product.
pub unsafe fn matmul_strided(precision: Precision, s: Strided) {
    let Dims { m, k, n } = s.dims;
    if m == 0 || n == 0 {
        return;
    }
    match precision {
        Precision::Bf16 if bf16_is_rounded_f32() => return rounded_f32(s, (false, false)),
        Precision::Bf16 => return super::packed::matmul_fused(s),
        Precision::F32 if super::sgemm::available() => return super::sgemm::matmul_fused(s),
        Precision::F32 => {}
    }
    let no_fusion = s.fusion.bias.is_none() && s.fusion.residual.is_none();
    assert!(
        no_fusion
            && s.fusion.col_sums.is_none()
            && !s.fusion.round_b
            && !s.fusion.round_a
            && s.fusion.b_half.is_none()
            && !s.fusion.a_bf16,
        "the gemm crate fuses no work"
    );
    let c = s.c.ptr;
    if k == 0 {
        if !s.adds() {
            for i in 0..m {
                std::ptr::write_bytes(c.add(i * s.c.rs), 0, n);
            }
        }
        return;
    }
    let parallelism = match s.parallel {
        true => parallelism(m, k, n),
        false => Parallelism::None,
    };
    // the gemm crate allocates small packing buffers inside each call; the count lets the
    // allocation test tell them from quill's own (tests/no_alloc.rs)
    GEMM_CALLS_ACTIVE.fetch_add(1, Ordering::SeqCst);
    let (a, b) = (s.a, s.b);
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        s.c.rs as isize,
        s.adds(),
        a.ptr,
        a.cs as isize,
        a.rs as isize,
        b.ptr,
        b.cs as isize,
        b.rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
    GEMM_CALLS_ACTIVE.fetch_sub(1, Ordering::SeqCst);
}

/// The bf16 product where the CPU has no bf16 dot product (`vdpbf16ps`): the f32 product of
/// the operands rounded to bf16 (to nearest even), each rounded as quill's f32 kernel copies
/// it into its own cache-sized buffers (B as it packs it, `Fusion::round_b`; A a block of
/// rows at a time, `Fusion::round_a`), the fused work done by that kernel as for f32 (the
/// column sums from B's unrounded values). The products of bf16 numbers are exact in f32, so
/// this is the same mixed-precision product (bf16 operands, f32 accumulation) as
/// [`super::packed`]'s, summed in another order; the plain packed kernel it replaced ran 4x
/// slower than f32 on an AVX2 machine (AMD EPYC Zen 3). An operand whose `ready` flag is set
/// holds bf16 numbers already and is read as it is. Nothing is allocated: the buffers are the
/// f32 kernel's own, each sized once to its largest block.
///
/// # Safety
/// As [`matmul_strided`]; the CPU has AVX2 (so [`super::sgemm`] runs the f32 product).
unsafe fn rounded_f32(s: Strided, ready: (bool, bool)) {
    debug_assert!(super::sgemm::available());
    let fusion = Fusion {
        round_a: !ready.0,
        round_b: !ready.1,
        ..s.fusion
    };
    super::sgemm::matmul_fused(Strided { fusion, ..s });
}

/// Whether this CPU's bf16 product is [`rounded_f32`]'s: both operands rounded to bf16 in f32
/// copies, then the f32 product (a CPU with AVX2 but no `vdpbf16ps`). A caller that uses one
/// operand in several products may then round it once itself ([`round_in_place`]) and ask for
/// f32 products of the rounded numbers: the same results, without rounding it again each time.
pub fn bf16_is_rounded_f32() -> bool {
    !has_bf16() && super::simd::has_avx2()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::bf16::{bf16_to_f32, round_bf16};
    use crate::kernels::reference;
    use crate::kernels::testutil::*;
    use crate::rng::Rng;

    /// The numbers rounded to bf16, in float64: what a bf16 product multiplies.
    fn rounded(v: &[f32]) -> Vec<f64> {
        v.iter()
            .map(|&x| bf16_to_f32(round_bf16(x)) as f64)
            .collect()
    }

    /// Every fused step against its plain definition, in both precisions and (bf16) on the
    /// SIMD path in parallel and serially and on the plain path: starting values (bias,
    /// residual) and the column sums of B, on awkward sizes, every transpose, several depth
    /// blocks, both split sides. C starts as NaN, so a starting value that is not applied
    /// everywhere shows.
    #[test]
    fn fused_work_matches_its_definition() {
        let mut rng = Rng::new(77);
        let q = rounded;
        for &(m, k, n) in &[
            (1, 1, 1),
            (13, 31, 33),
            (130, 515, 70),
            (40, 800, 200),
            (5, 0, 3),
        ] {
            for &(ta, tb) in &[(false, false), (false, true), (true, false), (true, true)] {
                let a = randn(&mut rng, m * k, 1.0);
                let b = randn(&mut rng, k * n, 1.0);
                let bias = randn(&mut rng, n, 1.0);
                let res = randn(&mut rng, m * n, 1.0);
                let sums0 = randn(&mut rng, n, 1.0);
                for way in 0..4 {
                    let (prec, name) = match way {
                        0 => (Precision::F32, "f32"),
                        1 => (Precision::Bf16, "bf16 parallel"),
                        2 => (Precision::Bf16, "bf16 serial"),
                        _ => (Precision::Bf16, "bf16 plain"),
                    };
                    let (qa, qb) = if prec == Precision::F32 {
                        (to_f64(&a), to_f64(&b))
                    } else {
                        (q(&a), q(&b))
                    };
                    let mut want = vec![0.0; m * n];
                    reference::matmul(&mut want, &qa, &qb, (m, k, n), (ta, tb));
                    for i in 0..m {
                        for j in 0..n {
                            want[i * n + j] += bias[j] as f64 + res[i * n + j] as f64;
                        }
                    }
                    let mut want_sums = to_f64(&sums0);
                    for (j, s) in want_sums.iter_mut().enumerate() {
                        for p in 0..k {
                            *s += b[if tb { j * k + p } else { p * n + j }] as f64;
                        }
                    }
                    let mut c = vec![f32::NAN; m * n];
                    let mut sums = sums0.clone();
                    if way < 2 {
                        let fused = Fused {
                            bias: Some(&bias),
                            residual: Some(&res),
                            col_sums: Some(&mut sums),
                        };
                        matmul_fused(
                            prec,
                            &mut c,
                            Operand::op(&a, m, k, ta),
                            Operand::op(&b, k, n, tb),
                            Accumulate::Overwrite,
                            fused,
                        );
                    } else {
                        let fusion = super::super::product::Fusion {
                            bias: Some(&bias),
                            residual: Some((res.as_ptr(), n)),
                            col_sums: Some(sums.as_mut_ptr()),
                            round_b: false,
                            round_a: false,
                            b_half: None,
                            a_bf16: false,
                        };
                        let s = Strided {
                            fusion,
                            ..strided(&mut c, &a, &b, (m, k, n), (ta, tb))
                        };
                        if way == 2 {
                            // Safety: the shapes match the buffers.
                            unsafe { super::super::packed::matmul_fused(s) }
                        } else {
                            super::super::packed::tests::plain(s);
                        }
                    }
                    let tol = if prec == Precision::F32 { 1e-5 } else { 2e-5 };
                    let what = format!("{name} {m}x{k}x{n} ta={ta} tb={tb}");
                    assert!(max_rel_err(&c, &want, 1.0) < tol, "{what}: product");
                    assert!(max_rel_err(&sums, &want_sums, 1.0) < 1e-5, "{what}: sums");
                }
            }
        }
    }

    /// The bf16 kernel reading stored bf16 weights W [n, k] as the A of yᵀ = W·xᵀ
    /// (`Fusion::a_bf16`: its pairs broadcast in place where its rows hold whole pairs, else
    /// copied into the panels as they are) against float64 products of the stored weights and
    /// x rounded to bf16: odd depths (the last pair's missing partner) and row strides, the
    /// rows' gaps NaN (a read past a row's depth shows), weights at an address that is not
    /// 4-byte aligned, row counts that are not whole tiles, several depth blocks, more column
    /// blocks than one, both split sides, a bias; in parallel, serially and on the plain path.
    #[test]
    fn bf16_weights_are_read_as_stored() {
        let mut rng = Rng::new(79);
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 7, 3),
            (13, 33, 31),
            (40, 801, 70),
            (130, 515, 70),
            (70, 384, 1601),
            (128, 960, 2560),
            (131, 800, 37),
        ] {
            for (gap, shift) in [(3, 0), (2, 1), (2, 0)] {
                let x = randn(&mut rng, m * k, 1.0);
                let w = randn(&mut rng, n * k, 1.0);
                let stride = k + gap;
                let mut wb = vec![0x7fc0u16; shift + n * stride];
                for j in 0..n {
                    for p in 0..k {
                        wb[shift + j * stride + p] = round_bf16(w[j * k + p]);
                    }
                }
                let wp = wb[shift..].as_ptr() as *const f32;
                let w64: Vec<f64> = w
                    .iter()
                    .map(|&v| bf16_to_f32(round_bf16(v)) as f64)
                    .collect();
                // yᵀ = W·xᵀ [n, m]
                let mut want = vec![0.0; n * m];
                reference::matmul(&mut want, &w64, &rounded(&x), (n, k, m), (false, true));
                let bias = randn(&mut rng, m, 1.0);
                for (i, v) in want.iter_mut().enumerate() {
                    *v += bias[i % m] as f64;
                }
                for way in 0..3 {
                    let mut c = vec![f32::NAN; n * m];
                    let fusion = Fusion {
                        bias: Some(&bias),
                        a_bf16: true,
                        ..Fusion::default()
                    };
                    let s = Strided {
                        fusion,
                        parallel: way == 0,
                        ..Strided::new(
                            Dims::new(n, k, m),
                            ViewMut::new(c.as_mut_ptr(), m),
                            View::new(wp, stride, 1),
                            View::new(x.as_ptr(), 1, k),
                            Accumulate::Overwrite,
                        )
                    };
                    match way {
                        // Safety: the views hold n rows of k bf16 values at their stride and
                        // m x k floats; C is n x m.
                        0 | 1 => unsafe { super::super::packed::matmul_fused(s) },
                        _ => super::super::packed::tests::plain(s),
                    }
                    let err = max_rel_err(&c, &want, 1.0);
                    assert!(
                        err < 2e-5,
                        "way {way} {m}x{k}x{n} gap {gap} shift {shift}: {err}"
                    );
                }
            }
        }
    }

    #[test]
    fn agrees_with_reference_on_awkward_sizes() {
        let mut rng = Rng::new(1);
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (17, 13, 1),
            (1, 31, 29),
            (64, 64, 64),
            (97, 61, 131),
            (256, 48, 300),
        ] {
            for &(ta, tb) in &[(false, false), (false, true), (true, false), (true, true)] {
                let a = randn(&mut rng, m * k, 1.0);
                let b = randn(&mut rng, k * n, 1.0);
                let c0 = randn(&mut rng, m * n, 1.0);
                for &acc in &[false, true] {
                    let mut c = c0.clone();
                    matmul(
                        Precision::F32,
                        &mut c,
                        Operand::op(&a, m, k, ta),
                        Operand::op(&b, k, n, tb),
                        Accumulate::from(acc),
                    );
                    let mut want = if acc { to_f64(&c0) } else { vec![0.0; m * n] };
                    reference::matmul(&mut want, &to_f64(&a), &to_f64(&b), (m, k, n), (ta, tb));
                    let err = max_rel_err(&c, &want, 1.0);
                    assert!(err < 1e-5, "{m}x{k}x{n} ta={ta} tb={tb} acc={acc}: {err}");
                }
            }
        }
    }

    /// Both paths against float64 products of the bf16-rounded operands, on awkward sizes
    /// (odd depth, fewer rows/columns than a tile, several blocks), every transpose, with and
    /// without accumulation, on one thread and split between threads.
    #[test]
    fn products_match_float64_of_rounded_operands() {
        let mut rng = Rng::new(42);
        let q = rounded;
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (13, 31, 33),
            (12, 32, 32),
            (17, 257, 1),
            (1, 300, 65),
            (130, 515, 70),
            (250, 64, 1600),
        ] {
            for &(ta, tb) in &[(false, false), (false, true), (true, false), (true, true)] {
                let a = randn(&mut rng, m * k, 1.0);
                let b = randn(&mut rng, k * n, 1.0);
                let c0 = randn(&mut rng, m * n, 1.0);
                for &acc in &[false, true] {
                    let mut want = if acc { to_f64(&c0) } else { vec![0.0; m * n] };
                    crate::kernels::reference::matmul(
                        &mut want,
                        &q(&a),
                        &q(&b),
                        (m, k, n),
                        (ta, tb),
                    );
                    let mut got = c0.clone();
                    matmul(
                        Precision::Bf16,
                        &mut got,
                        Operand::op(&a, m, k, ta),
                        Operand::op(&b, k, n, tb),
                        Accumulate::from(acc),
                    );
                    let err = max_rel_err(&got, &want, 1.0);
                    assert!(err < 2e-5, "{m}x{k}x{n} ta={ta} tb={tb} acc={acc}: {err}");
                    // operands the caller rounded and marked so (read in place where the
                    // product rounds into copies): the same product
                    let f = |v: &[f32]| -> Vec<f32> { q(v).iter().map(|&x| x as f32).collect() };
                    let (ra, rb) = (f(&a), f(&b));
                    for (ma, mb) in [(true, false), (false, true), (true, true)] {
                        let oa = Operand::op(if ma { &ra } else { &a }, m, k, ta);
                        let ob = Operand::op(if mb { &rb } else { &b }, k, n, tb);
                        let oa = if ma { oa.rounded() } else { oa };
                        let ob = if mb { ob.rounded() } else { ob };
                        let mut marked = c0.clone();
                        matmul(Precision::Bf16, &mut marked, oa, ob, Accumulate::from(acc));
                        let err = max_rel_err(&marked, &want, 1.0);
                        assert!(
                            err < 2e-5,
                            "marked {ma} {mb} {m}x{k}x{n} ta={ta} tb={tb}: {err}"
                        );
                    }
                    let mut plain = c0.clone();
                    crate::kernels::packed::tests::plain(Strided {
                        accumulate: Accumulate::from(acc),
                        ..strided(&mut plain, &a, &b, (m, k, n), (ta, tb))
                    });
                    let err = max_rel_err(&plain, &want, 1.0);
                    assert!(
                        err < 2e-5,
                        "plain {m}x{k}x{n} ta={ta} tb={tb} acc={acc}: {err}"
                    );
                    // and the f32 product itself within bf16's rounding (8 bits of mantissa)
                    let mut exact = if acc { to_f64(&c0) } else { vec![0.0; m * n] };
                    crate::kernels::reference::matmul(
                        &mut exact,
                        &to_f64(&a),
                        &to_f64(&b),
                        (m, k, n),
                        (ta, tb),
                    );
                    let err = max_rel_err(&got, &exact, 1.0);
                    assert!(err < 3e-2, "vs f32 {m}x{k}x{n}: {err}");
                }
            }
        }
    }

    /// Views whose rows and columns are both strided (every other element), which the bf16
    /// product gathers instead of copying lines, with B's column sums, against float64.
    #[test]
    fn gathered_views_in_bf16() {
        let mut rng = Rng::new(9);
        for &(m, k, n) in &[(1, 1, 1), (7, 19, 5), (40, 70, 33)] {
            // A(i, p) at 2·(i·k + p) + 1; B(p, j) at 3·(p·n + j)
            let a = randn(&mut rng, 2 * m * k + 1, 1.0);
            let b = randn(&mut rng, 3 * k * n, 1.0);
            let ga: Vec<f32> = (0..m * k).map(|x| a[2 * x + 1]).collect();
            let gb: Vec<f32> = (0..k * n).map(|x| b[3 * x]).collect();
            let mut want = vec![0.0; m * n];
            let q = rounded;
            crate::kernels::reference::matmul(
                &mut want,
                &q(&ga),
                &q(&gb),
                (m, k, n),
                (false, false),
            );
            let want_sums: Vec<f64> = (0..n)
                .map(|j| (0..k).map(|p| gb[p * n + j] as f64).sum())
                .collect();
            let (mut c, mut sums) = (vec![f32::NAN; m * n], vec![0.0f32; n]);
            // Safety: the strides reach only the elements above.
            unsafe {
                let s = Strided::new(
                    Dims::new(m, k, n),
                    ViewMut::new(c.as_mut_ptr(), n),
                    View::new(a.as_ptr().add(1), 2 * k, 2),
                    View::new(b.as_ptr(), 3 * n, 3),
                    Accumulate::Overwrite,
                );
                let fusion = Fusion {
                    col_sums: Some(sums.as_mut_ptr()),
                    ..Fusion::default()
                };
                matmul_strided(Precision::Bf16, Strided { fusion, ..s });
            }
            assert!(max_rel_err(&c, &want, 1.0) < 2e-5, "{m}x{k}x{n}");
            assert!(
                max_rel_err(&sums, &want_sums, 1.0) < 1e-5,
                "{m}x{k}x{n} sums"
            );
        }
    }

    #[test]
    fn zero_depth_clears_or_keeps() {
        let mut c = vec![1.0f32; 6];
        matmul(
            Precision::Bf16,
            &mut c,
            Operand::new(&[], 2, 0),
            Operand::new(&[], 0, 3),
            Accumulate::Add,
        );
        assert_eq!(c, vec![1.0; 6]);
        matmul(
            Precision::Bf16,
            &mut c,
            Operand::new(&[], 2, 0),
            Operand::new(&[], 0, 3),
            Accumulate::Overwrite,
        );
        assert_eq!(c, vec![0.0; 6]);
    }
}
