//! Matrix multiply: C (+)= op(A) · op(B), row-major. f32 products run on quill's own kernel
//! ([`super::sgemm`]) where the CPU has AVX-512, and on the `gemm` crate's cache-blocked SIMD
//! kernels (AVX2, chosen at run time) elsewhere; bf16 operands on [`super::packed`].

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
    /// f32 operands (the `gemm` crate).
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

/// [`matmul`] with operands in the given precision (f32 accumulation and output either way).
#[allow(clippy::too_many_arguments)]
pub fn matmul_p(
    precision: Precision,
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    match precision {
        Precision::F32 => matmul(c, a, b, m, k, n, trans_a, trans_b, accumulate),
        Precision::Bf16 => super::bf16::matmul(c, a, b, m, k, n, trans_a, trans_b, accumulate),
    }
}

/// Work fused into a product, so it needs no pass of its own over memory: inside quill's
/// kernels (bf16, and f32 with AVX-512) the starting values go into the tile stores and the
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

/// The strided, fused entry point of quill's product kernels ([`super::packed::matmul_fused`],
/// [`super::sgemm::matmul_fused`]).
type StridedFused = for<'a> unsafe fn(
    usize,
    usize,
    usize,
    *mut f32,
    usize,
    *const f32,
    usize,
    usize,
    *const f32,
    usize,
    usize,
    bool,
    bool,
    super::packed::Fusion<'a>,
);

/// [`matmul_p`] with work fused into it (see [`Fused`]). A starting value (bias or residual)
/// excludes `accumulate`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_fused(
    precision: Precision,
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
    fused: Fused,
) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let init = fused.bias.is_some() || fused.residual.is_some();
    assert!(
        !(init && accumulate),
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
    // quill's own kernels (bf16 always, f32 with AVX-512) share one strided signature
    let kernel: Option<StridedFused> = match precision {
        Precision::Bf16 => Some(super::packed::matmul_fused),
        Precision::F32 if super::sgemm::available() => Some(super::sgemm::matmul_fused),
        Precision::F32 => None,
    };
    match kernel {
        Some(kernel) => {
            let (a_rs, a_cs) = if trans_a { (1, m) } else { (k, 1) };
            let (b_rs, b_cs) = if trans_b { (1, k) } else { (n, 1) };
            let fusion = super::packed::Fusion {
                bias: fused.bias,
                residual: fused.residual.map(|r| (r.as_ptr(), n)),
                col_sums: fused.col_sums.map(|s| s.as_mut_ptr()),
            };
            // Safety: the asserts above bound every index the strides reach; sgemm is only
            // chosen where the CPU has AVX-512.
            unsafe {
                kernel(
                    m,
                    k,
                    n,
                    c.as_mut_ptr(),
                    n,
                    a.as_ptr(),
                    a_rs,
                    a_cs,
                    b.as_ptr(),
                    b_rs,
                    b_cs,
                    accumulate,
                    true,
                    fusion,
                )
            }
        }
        None => {
            let c = &mut c[..m * n];
            if init {
                super::init_rows(c, fused.bias, fused.residual.map(|r| &r[..m * n]), n);
            }
            if let Some(sums) = fused.col_sums {
                if trans_b {
                    for (j, s) in sums[..n].iter_mut().enumerate() {
                        *s += b[j * k..(j + 1) * k].iter().fold(0.0, |acc, &x| acc + x);
                    }
                } else {
                    super::reduce::col_sum_acc(&mut sums[..n], b, k);
                }
            }
            matmul(c, a, b, m, k, n, trans_a, trans_b, accumulate || init);
        }
    }
}

/// c[m,n] (+)= op(a)[m,k] · op(b)[k,n].
/// `a` is stored [m,k], or [k,m] when `trans_a`; `b` is stored [k,n], or [n,k] when `trans_b`.
/// With `accumulate` the product is added to `c`, otherwise it overwrites `c`.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) {
    assert!(c.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    if m == 0 || n == 0 {
        return;
    }
    let (a_rs, a_cs) = if trans_a {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let (b_rs, b_cs) = if trans_b {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    // Safety: the asserts above bound every index the strides reach.
    unsafe {
        matmul_strided(
            m,
            k,
            n,
            c.as_mut_ptr(),
            n as isize,
            a.as_ptr(),
            a_rs,
            a_cs,
            b.as_ptr(),
            b_rs,
            b_cs,
            accumulate,
            parallelism(m, k, n),
        );
    }
}

/// The strided form, for views into larger buffers (attention heads inside a qkv matrix).
/// Row stride `c_rs` for c (column stride 1); a[i,p] at a + i*a_rs + p*a_cs; b[p,j] at b + p*b_rs + j*b_cs.
///
/// # Safety
/// Every element reached through the strides must lie inside live allocations, and `c`'s
/// elements must not be written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_strided(
    m: usize,
    k: usize,
    n: usize,
    c: *mut f32,
    c_rs: isize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    accumulate: bool,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                std::ptr::write_bytes(c.offset(i as isize * c_rs), 0, n);
            }
        }
        return;
    }
    if super::sgemm::available() && c_rs >= 0 && a_rs >= 0 && a_cs >= 0 && b_rs >= 0 && b_cs >= 0 {
        let parallel = matches!(parallelism, Parallelism::Rayon(_));
        super::sgemm::matmul_fused(
            m,
            k,
            n,
            c,
            c_rs as usize,
            a,
            a_rs as usize,
            a_cs as usize,
            b,
            b_rs as usize,
            b_cs as usize,
            accumulate,
            parallel,
            super::packed::Fusion::default(),
        );
        return;
    }
    // the gemm crate allocates small packing buffers inside each call; the count lets the
    // allocation test tell them from quill's own (tests/no_alloc.rs)
    GEMM_CALLS_ACTIVE.fetch_add(1, Ordering::SeqCst);
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        c_rs,
        accumulate,
        a,
        a_cs,
        a_rs,
        b,
        b_cs,
        b_rs,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
    GEMM_CALLS_ACTIVE.fetch_sub(1, Ordering::SeqCst);
}

/// One-thread strided product, for callers that parallelise over heads themselves.
///
/// # Safety
/// As [`matmul_strided`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_strided_serial(
    m: usize,
    k: usize,
    n: usize,
    c: *mut f32,
    c_rs: isize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
    accumulate: bool,
) {
    matmul_strided(
        m,
        k,
        n,
        c,
        c_rs,
        a,
        a_rs,
        a_cs,
        b,
        b_rs,
        b_cs,
        accumulate,
        Parallelism::None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::reference;
    use crate::kernels::testutil::*;
    use crate::rng::Rng;

    /// Every fused step against its plain definition, in both precisions and (bf16) on the
    /// SIMD path in parallel and serially and on the plain path: starting values (bias,
    /// residual) and the column sums of B, on awkward sizes, every transpose, several depth
    /// blocks, both split sides. C starts as NaN, so a starting value that is not applied
    /// everywhere shows.
    #[test]
    fn fused_work_matches_its_definition() {
        use super::super::bf16::{bf16_to_f32, round_bf16};
        let mut rng = Rng::new(77);
        let q = |v: &[f32]| -> Vec<f64> {
            v.iter()
                .map(|&x| bf16_to_f32(round_bf16(x)) as f64)
                .collect()
        };
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
                    reference::matmul(&mut want, &qa, &qb, m, k, n, ta, tb);
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
                        matmul_fused(prec, &mut c, &a, &b, m, k, n, ta, tb, false, fused);
                    } else {
                        let (a_rs, a_cs) = if ta { (1, m) } else { (k, 1) };
                        let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
                        let fusion = super::super::packed::Fusion {
                            bias: Some(&bias),
                            residual: Some((res.as_ptr(), n)),
                            col_sums: Some(sums.as_mut_ptr()),
                        };
                        if way == 2 {
                            // Safety: the shapes match the buffers.
                            unsafe {
                                super::super::packed::matmul_fused(
                                    m,
                                    k,
                                    n,
                                    c.as_mut_ptr(),
                                    n,
                                    a.as_ptr(),
                                    a_rs,
                                    a_cs,
                                    b.as_ptr(),
                                    b_rs,
                                    b_cs,
                                    false,
                                    false,
                                    fusion,
                                )
                            }
                        } else {
                            super::super::packed::tests::plain_fused(
                                &mut c, &a, &b, m, k, n, ta, tb, false, fusion,
                            );
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
                    matmul(&mut c, &a, &b, m, k, n, ta, tb, acc);
                    let mut want = if acc { to_f64(&c0) } else { vec![0.0; m * n] };
                    reference::matmul(&mut want, &to_f64(&a), &to_f64(&b), m, k, n, ta, tb);
                    let err = max_rel_err(&c, &want, 1.0);
                    assert!(err < 1e-5, "{m}x{k}x{n} ta={ta} tb={tb} acc={acc}: {err}");
                }
            }
        }
    }
}
