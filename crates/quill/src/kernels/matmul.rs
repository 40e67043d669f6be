//! Matrix multiply: C (+)= op(A) · op(B), row-major, on the `gemm` crate's cache-blocked
//! SIMD kernels (AVX-512 where the CPU has it, chosen at run time).

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
