//! Run-time SIMD dispatch. Elementwise kernels are written once as plain Rust loops; the
//! `multiversion!` macro compiles each body three times (AVX-512, AVX2+FMA, baseline) and
//! picks the widest the CPU has, detected at run time. The loops are written so the compiler
//! vectorises them (no calls to libm, no float-to-int conversions).

/// Which path the dispatch takes on this CPU.
pub fn level() -> &'static str {
    if has_avx512() {
        "avx512"
    } else if has_avx2() {
        "avx2"
    } else {
        "scalar"
    }
}

#[inline]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cap() >= Cap::Avx512
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cap() >= Cap::Avx2
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The widest kernel family the dispatch may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cap {
    Scalar,
    Avx2,
    Avx512,
}

impl Cap {
    /// `scalar`, `avx2` or `avx512`.
    pub fn parse(s: &str) -> Option<Cap> {
        match s {
            "scalar" => Some(Cap::Scalar),
            "avx2" => Some(Cap::Avx2),
            "avx512" => Some(Cap::Avx512),
            _ => None,
        }
    }
}

/// `QUILL_SIMD=scalar|avx2|avx512` caps the kernel families the dispatch takes (to check
/// each family against the plain path on the same inputs, or to run as a CPU without the
/// wider ones would; AVX-512 BF16 and VNNI need `avx512`). Unset: the widest the CPU has.
/// An unknown value is reported once and ignored.
pub fn cap() -> Cap {
    use std::sync::OnceLock;
    static CAP: OnceLock<Cap> = OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("QUILL_SIMD") {
        Ok(v) => Cap::parse(&v).unwrap_or_else(|| {
            eprintln!("warning: QUILL_SIMD={v:?} is not scalar, avx2 or avx512; ignored");
            Cap::Avx512
        }),
        Err(_) => Cap::Avx512,
    })
}

/// Defines `fn name(args) -> ret { body }` compiled for AVX-512, AVX2+FMA and the baseline,
/// dispatching at run time.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if $crate::kernels::simd::has_avx512() {
                    // Safety: the CPU has the features v4 was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if $crate::kernels::simd::has_avx2() {
                    // Safety: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Asks for the cache lines of a `rows` x `cols` f32 tile at `c` (row stride `rs`) ahead of a
/// register tile's stores (`write`: in the exclusive state) or reads. A product's output rows
/// usually lie in memory last touched a training step ago; without this, each tile's stores
/// wait for those lines one by one once the arithmetic is done. A hint only: it never faults
/// and changes no value, so any address will do.
#[inline(always)]
#[cfg(target_arch = "x86_64")]
pub(crate) fn prefetch_tile(c: *const f32, rs: usize, rows: usize, cols: usize, write: bool) {
    use std::arch::x86_64::*;
    let hint = |p: *const f32| {
        // Safety: SSE is part of x86_64's baseline, and a prefetch never faults or writes
        unsafe {
            if write {
                _mm_prefetch::<_MM_HINT_ET0>(p as *const i8);
            } else {
                _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
            }
        }
    };
    if cols == 0 {
        return;
    }
    for r in 0..rows {
        let row = c.wrapping_add(r * rs);
        // every line the row's floats touch: one per 16 floats, and the last
        for j in (0..cols).step_by(16) {
            hint(row.wrapping_add(j));
        }
        hint(row.wrapping_add(cols - 1));
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    /// The hint is safe to call on any address: null, far past an allocation, a tile of
    /// nothing; and it leaves the tile's values alone.
    #[test]
    fn prefetch_tile_never_faults_or_writes() {
        super::prefetch_tile(std::ptr::null(), 1 << 40, 6, 64, true);
        super::prefetch_tile(usize::MAX as *const f32, 3, 2, 17, false);
        let v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        super::prefetch_tile(v.as_ptr(), 10, 10, 10, true);
        super::prefetch_tile(v.as_ptr(), 10, 3, 0, true);
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
    }
}

/// Mask of the first min(n, 16) lanes.
#[inline]
pub fn mask16(n: usize) -> u16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// 16 x 16 transpose of 32-bit elements: out[j] lane i = rows[i] lane j.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn transpose16(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // within each 128-bit lane: pairs of rows interleaved, then quads
    let mut t = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        let (a, b, c, d) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
        let ab_lo = _mm512_unpacklo_epi32(a, b);
        let ab_hi = _mm512_unpackhi_epi32(a, b);
        let cd_lo = _mm512_unpacklo_epi32(c, d);
        let cd_hi = _mm512_unpackhi_epi32(c, d);
        // u[4g + j], lane L = rows 4g..4g+4 at column 4L + j
        t[4 * g] = _mm512_unpacklo_epi64(ab_lo, cd_lo);
        t[4 * g + 1] = _mm512_unpackhi_epi64(ab_lo, cd_lo);
        t[4 * g + 2] = _mm512_unpacklo_epi64(ab_hi, cd_hi);
        t[4 * g + 3] = _mm512_unpackhi_epi64(ab_hi, cd_hi);
    }
    let mut out = [_mm512_setzero_si512(); 16];
    for j in 0..4 {
        let (a, b, c, d) = (t[j], t[4 + j], t[8 + j], t[12 + j]);
        let v0 = _mm512_shuffle_i32x4::<0x88>(a, b);
        let v1 = _mm512_shuffle_i32x4::<0xdd>(a, b);
        let w0 = _mm512_shuffle_i32x4::<0x88>(c, d);
        let w1 = _mm512_shuffle_i32x4::<0xdd>(c, d);
        out[j] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        out[8 + j] = _mm512_shuffle_i32x4::<0xdd>(v0, w0);
        out[4 + j] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        out[12 + j] = _mm512_shuffle_i32x4::<0xdd>(v1, w1);
    }
    out
}

/// AVX2 lane mask of the first min(n, 8) lanes (all bits set in a lane that is in).
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn mask8(n: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), lanes)
}

/// 8 x 8 transpose of 32-bit elements: out[j] lane i = rows[i] lane j.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub unsafe fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    // pairs of rows interleaved, then quads, within each 128-bit half
    let mut t = [_mm256_setzero_ps(); 8];
    for g in 0..2 {
        let (a, b, c, d) = (r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]);
        let ab_lo = _mm256_unpacklo_ps(a, b);
        let ab_hi = _mm256_unpackhi_ps(a, b);
        let cd_lo = _mm256_unpacklo_ps(c, d);
        let cd_hi = _mm256_unpackhi_ps(c, d);
        // t[4g + j], half H = rows 4g..4g+4 at column 4H + j
        t[4 * g] = _mm256_shuffle_ps::<0x44>(ab_lo, cd_lo);
        t[4 * g + 1] = _mm256_shuffle_ps::<0xee>(ab_lo, cd_lo);
        t[4 * g + 2] = _mm256_shuffle_ps::<0x44>(ab_hi, cd_hi);
        t[4 * g + 3] = _mm256_shuffle_ps::<0xee>(ab_hi, cd_hi);
    }
    let mut out = [_mm256_setzero_ps(); 8];
    for j in 0..4 {
        out[j] = _mm256_permute2f128_ps::<0x20>(t[j], t[4 + j]);
        out[4 + j] = _mm256_permute2f128_ps::<0x31>(t[j], t[4 + j]);
    }
    out
}
