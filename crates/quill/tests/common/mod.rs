//! What the reference tests of packed batches and LoRA share: the fixtures' folder, stored
//! tensors as f64, and the largest difference from a reference.
#![allow(dead_code)]

use quill::io::safetensors::SafetensorsFile;
use std::path::PathBuf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// A stored tensor as its shape and its values (i64 ids as f64, exact below 2^53).
pub fn read(f: &SafetensorsFile, name: &str) -> (Vec<usize>, Vec<f64>) {
    let st = f.tensors().unwrap();
    let v = st.tensor(name).unwrap();
    let data = match v.dtype() {
        safetensors::Dtype::F32 => v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::I64 => v
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    };
    (v.shape().to_vec(), data)
}

/// max |got - want|.
pub fn max_diff(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) },
        )
}

/// max |x|.
pub fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// How many gradients `f` stores (names starting with "grad.").
pub fn stored_gradients(f: &SafetensorsFile) -> usize {
    f.names()
        .unwrap()
        .iter()
        .filter(|n| n.starts_with("grad."))
        .count()
}
