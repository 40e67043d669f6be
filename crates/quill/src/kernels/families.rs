//! The kernel families a run takes on this CPU (and those the CPU has that quill does not
//! use), with the CPU's name: what `quill bench` reports beside every result.

use serde::Serialize;

/// The kernel families of this CPU: what it has, and what this run takes (`QUILL_SIMD` caps
/// the dispatch).
#[derive(Debug, Serialize, Clone)]
pub struct Kernels {
    /// Elementwise and f32 product kernels: avx512, avx2 or scalar.
    pub f32: &'static str,
    /// bf16 products on AVX-512 BF16 (`vdpbf16ps`); false: operands rounded to bf16 and
    /// multiplied by the f32 product (with AVX2), or a plain path.
    pub avx512_bf16: bool,
    /// Quantized dot products: avx512-vnni, avx2 or plain.
    pub int8: &'static str,
    /// The CPU has AMX tiles (bf16 / int8); quill has no AMX kernel yet.
    pub amx_bf16: bool,
    pub amx_int8: bool,
    /// The value of QUILL_SIMD, when set.
    pub forced: Option<String>,
}

/// The kernel families this run takes on this CPU.
pub fn kernels() -> Kernels {
    let flags = cpu_flags();
    Kernels {
        f32: super::simd::level(),
        avx512_bf16: super::bf16::has_bf16(),
        int8: match super::quant::dot::isa() {
            super::quant::dot::Isa::Avx512Vnni => "avx512-vnni",
            super::quant::dot::Isa::Avx2 => "avx2",
            super::quant::dot::Isa::Plain => "plain",
        },
        amx_bf16: flags.iter().any(|f| f == "amx_bf16"),
        amx_int8: flags.iter().any(|f| f == "amx_int8"),
        forced: std::env::var("QUILL_SIMD")
            .ok()
            .filter(|v| super::simd::Cap::parse(v).is_some()),
    }
}

impl Kernels {
    /// One line: the families taken, and those the CPU has that quill does not use.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "f32 {}, bf16 {}, int8 {}",
            self.f32,
            if self.avx512_bf16 {
                "avx512-bf16"
            } else if self.f32 != "scalar" {
                "as rounded f32"
            } else {
                "plain"
            },
            self.int8
        );
        if self.amx_bf16 || self.amx_int8 {
            s += "; the CPU has AMX, which quill does not use yet";
        }
        if let Some(f) = &self.forced {
            s += &format!(" (QUILL_SIMD={f})");
        }
        s
    }
}

fn cpuinfo_field(name: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

fn cpu_flags() -> Vec<String> {
    cpuinfo_field("flags")
        .map(|f| f.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// The CPU's model name, as /proc/cpuinfo gives it, with its family and model numbers and,
/// where they are known, the core generation: "AMD EPYC (family 26, model 2: Zen 5)". Cloud
/// VMs often report only "AMD EPYC", which names three generations with different kernels
/// and speeds; the numbers keep results from different machines apart. "unknown CPU" where
/// /proc/cpuinfo has no model name.
pub fn cpu_name() -> String {
    let Some(name) = cpuinfo_field("model name") else {
        return "unknown CPU".into();
    };
    let number = |field| cpuinfo_field(field).and_then(|v| v.parse::<u32>().ok());
    match (number("cpu family"), number("model")) {
        (Some(family), Some(model)) => {
            let vendor = cpuinfo_field("vendor_id").unwrap_or_default();
            match generation(&vendor, family, model) {
                Some(g) => format!("{name} (family {family}, model {model}: {g})"),
                None => format!("{name} (family {family}, model {model})"),
            }
        }
        _ => name,
    }
}

/// The core generation of an x86 CPU from its vendor string and its (display) family and
/// model numbers, as AMD's and Intel's processor guides number them; None where this table
/// does not know it. It names the server parts of this project's machine pool and their
/// neighbours, not every CPU made.
fn generation(vendor: &str, family: u32, model: u32) -> Option<&'static str> {
    match (vendor, family) {
        ("AuthenticAMD", 23) => Some(if model >= 0x30 { "Zen 2" } else { "Zen / Zen+" }),
        ("AuthenticAMD", 25) => match model {
            0x00..=0x0f | 0x20..=0x2f | 0x40..=0x5f => Some("Zen 3"),
            0x10..=0x1f | 0x60..=0x7f | 0xa0..=0xaf => Some("Zen 4"),
            _ => None,
        },
        ("AuthenticAMD", 26) => Some("Zen 5"),
        ("GenuineIntel", 6) => match model {
            0x55 => Some("Skylake-SP / Cascade Lake"),
            0x6a | 0x6c => Some("Ice Lake-SP"),
            0x8f => Some("Sapphire Rapids"),
            0xcf => Some("Emerald Rapids"),
            0xad | 0xae => Some("Granite Rapids"),
            0xaf => Some("Sierra Forest"),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod naming {
    use super::generation;

    /// The numbers of the machines this project has run on, and of their neighbours, as the
    /// vendors' guides give them (Zen 3 Milan 25/1, Zen 4 Genoa 25/17, Zen 5 Turin 26/2,
    /// Sapphire Rapids 6/143).
    #[test]
    fn known_cpus_are_named_by_generation() {
        assert_eq!(generation("AuthenticAMD", 25, 1), Some("Zen 3"));
        assert_eq!(generation("AuthenticAMD", 25, 17), Some("Zen 4"));
        assert_eq!(generation("AuthenticAMD", 26, 2), Some("Zen 5"));
        assert_eq!(generation("GenuineIntel", 6, 143), Some("Sapphire Rapids"));
        assert_eq!(generation("GenuineIntel", 6, 207), Some("Emerald Rapids"));
        assert_eq!(generation("AuthenticAMD", 25, 0xff), None);
        assert_eq!(generation("GenuineIntel", 25, 1), None);
        assert_eq!(generation("", 6, 143), None);
    }

    #[test]
    fn the_name_carries_family_and_model() {
        let name = super::cpu_name();
        eprintln!("this CPU: {name}");
        if let Ok(text) = std::fs::read_to_string("/proc/cpuinfo") {
            if text.lines().any(|l| l.starts_with("cpu family")) {
                assert!(name.contains("(family "), "{name}");
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use crate::kernels::quant::dot::{isa, Isa};
    use crate::kernels::simd::{cap, has_avx2, has_avx512, level, Cap};

    /// `QUILL_SIMD` bounds every family the kernels dispatch to, so that a test run under
    /// `QUILL_SIMD=avx2` or `scalar` (run-tests does both) checks those paths against the
    /// plain references on the same inputs; it says which families this CPU lacks.
    #[test]
    fn the_cap_bounds_every_kernel_family() {
        let c = cap();
        let k = super::kernels();
        eprintln!("QUILL_SIMD cap {c:?}; this run's kernels: {}", k.describe());
        for (feature, has) in [
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            (
                "avx512bf16",
                std::arch::is_x86_feature_detected!("avx512bf16"),
            ),
            (
                "avx512vnni",
                std::arch::is_x86_feature_detected!("avx512vnni"),
            ),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
        ] {
            if !has {
                eprintln!("this CPU has no {feature}: its kernels are not checked here");
            }
        }
        if c < Cap::Avx512 {
            assert!(!has_avx512() && !crate::kernels::bf16::has_bf16());
            assert_ne!(isa(), Isa::Avx512Vnni);
        }
        if c < Cap::Avx2 {
            assert!(!has_avx2());
            assert!(!crate::kernels::sgemm::available());
            assert_eq!(level(), "scalar");
            assert_eq!(isa(), Isa::Plain);
        }
        assert_eq!(k.f32, level());
        assert_eq!(Cap::parse("avx2"), Some(Cap::Avx2));
        assert_eq!(Cap::parse("AVX2"), None);
    }
}
