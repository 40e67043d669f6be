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
        !forced_scalar()
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
        !forced_scalar()
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `QUILL_SIMD=scalar` turns the SIMD paths off (for checking them against the plain path).
fn forced_scalar() -> bool {
    use std::sync::OnceLock;
    static SCALAR: OnceLock<bool> = OnceLock::new();
    *SCALAR.get_or_init(|| std::env::var("QUILL_SIMD").is_ok_and(|v| v == "scalar"))
}

/// Defines `fn name(args) -> ret { body }` compiled for AVX-512, AVX2+FMA and the baseline,
/// dispatching at run time.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
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
