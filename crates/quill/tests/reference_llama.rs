//! Llama and Qwen2 against PyTorch + `transformers` (tests/fixtures/llama-tiny and
//! qwen2-tiny, made by ../shared/bench/pytorch/make_reference.py): logits, loss, the gradient
//! of every parameter, and greedy generation through the KV cache (grouped-query attention,
//! RoPE with theta 1e4 and 1e6, untied and tied heads, Qwen2's q/k/v biases).
//!
//! Tolerances (the fixtures' README measures float32-vs-float64 differences of about 5e-6
//! for logits and 6e-7 for gradients): logits 1e-4 abs, loss 1e-5 abs, each gradient 1e-4
//! relative to its tensor's largest |value| (or 1e-5 abs), greedy ids exact, and the cached
//! logits of every greedy step 1e-4 abs.

use quill::io::hf::load;
use quill::io::safetensors::SafetensorsFile;
use quill::kernels::crossentropy::IGNORE;
use quill::kernels::matmul::Precision;
use quill::model::{Activations, Batch};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn read(f: &SafetensorsFile, name: &str) -> (Vec<usize>, Vec<f32>) {
    let st = f.tensors().unwrap();
    let v = st.tensor(name).unwrap();
    let shape = v.shape().to_vec();
    let data: Vec<f32> = match v.dtype() {
        safetensors::Dtype::F32 => v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::I64 => v
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        d => panic!("unexpected dtype {d:?}"),
    };
    (shape, data)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        )
}

fn check_training_pass(name: &str) {
    check_pass(name, Precision::F32);
    check_pass(name, Precision::Bf16);
}

/// One training pass against the reference. f32: logits 1e-4 abs, loss 1e-5, gradients 1e-4
/// of each tensor's largest |value|. bf16 mixed precision (operands of every product rounded
/// to bf16, f32 accumulation): logits 2e-2 of their largest |value|, loss 1e-2, gradients
/// 5e-2 of each tensor's largest |value| with cosine similarity above 0.999, and logits that
/// differ from the f32 ones (so the bf16 path is the one checked).
fn check_pass(name: &str, precision: Precision) {
    let mut model = load(&fixture(name), false).unwrap();
    model.precision = precision;
    let bf16 = precision == Precision::Bf16;
    assert!(!model.is_mapped());
    let expected = SafetensorsFile::open(&fixture(name).join("expected.safetensors")).unwrap();
    let (shape, ids) = read(&expected, "input_ids");
    let (b, t) = (shape[0], shape[1]);
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let targets: Vec<u32> = (0..b * t)
        .map(|k| if k % t == t - 1 { IGNORE } else { ids[k + 1] })
        .collect();
    let mut acts = Activations::new(&model, b, t);
    model.forward(&mut acts, &ids).unwrap();
    let (_, want_logits) = read(&expected, "logits");
    let d = max_abs_diff(&acts.logits, &want_logits);
    let scale = want_logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if bf16 {
        assert!(
            d < 2e-2 * scale,
            "{name}: bf16 logits differ by {d} (max {scale})"
        );
        assert!(d > 1e-6, "{name}: bf16 made no difference");
    } else {
        assert!(d < 1e-4, "{name}: logits differ by {d}");
    }

    let (sum, count) = model.loss(&mut acts, &targets);
    let (_, want_loss) = read(&expected, "loss");
    let loss = sum / count as f64;
    assert!(
        (loss - want_loss[0] as f64).abs() < if bf16 { 1e-2 } else { 1e-5 },
        "{name}: loss {loss} vs {}",
        want_loss[0]
    );

    let mut grads = vec![0.0; model.num_params()];
    model.backward(&mut acts, &mut grads, Batch::new(&ids, &targets, 1.0));
    let mut checked = 0;
    for spec in &model.layout.tensors {
        let (gshape, want) = read(&expected, &format!("grad.{}", spec.name));
        assert_eq!(gshape, spec.shape, "{}", spec.name);
        let got = spec.view.of(&grads);
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(got, &want);
        if bf16 {
            if scale > 1e-6 {
                assert!(
                    diff <= 5e-2 * scale,
                    "{name}: bf16 gradient of {} differs by {diff} (tensor max {scale})",
                    spec.name
                );
                let dot: f64 = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                let na: f64 = got.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
                let nb: f64 = want.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
                let cos = dot / (na * nb);
                assert!(
                    cos > 0.999,
                    "{name}: bf16 gradient of {}: cosine {cos}",
                    spec.name
                );
            }
            checked += 1;
            continue;
        }
        assert!(
            diff <= 1e-4 * scale.max(1e-3) || diff < 1e-5,
            "{name}: gradient of {} differs by {diff} (tensor max {scale})",
            spec.name
        );
        checked += 1;
    }
    let stored = expected
        .names()
        .unwrap()
        .iter()
        .filter(|n| n.starts_with("grad."))
        .count();
    assert_eq!(checked, stored, "{name}: every stored gradient is checked");
}

fn check_greedy(name: &str, map: bool) {
    let model = load(&fixture(name), map).unwrap();
    assert_eq!(model.is_mapped(), map);
    let expected = SafetensorsFile::open(&fixture(name).join("expected.safetensors")).unwrap();
    let (_, greedy) = read(&expected, "greedy_ids");
    let greedy: Vec<u32> = greedy.iter().map(|&x| x as u32).collect();
    let (_, want_logits) = read(&expected, "greedy_logits");
    let v = model.vocab_size();
    let n_new = want_logits.len() / v;
    let prompt = &greedy[..greedy.len() - n_new];
    let mut cache = model.new_cache(64);
    let mut logits = Vec::new();
    let mut ids = prompt.to_vec();
    model
        .forward_cached(&mut cache, prompt, &mut logits, false)
        .unwrap();
    for step in 0..n_new {
        let d = max_abs_diff(&logits, &want_logits[step * v..(step + 1) * v]);
        assert!(d < 1e-4, "{name}: greedy step {step} logits differ by {d}");
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        ids.push(next);
        model
            .forward_cached(&mut cache, &[next], &mut logits, false)
            .unwrap();
    }
    assert_eq!(ids, greedy, "{name}: greedy ids");
}

#[test]
fn llama_logits_loss_and_every_gradient_match_transformers() {
    check_training_pass("llama-tiny");
}

#[test]
fn qwen2_logits_loss_and_every_gradient_match_transformers() {
    check_training_pass("qwen2-tiny");
}

#[test]
fn greedy_generation_with_kv_cache_matches_transformers() {
    for name in ["llama-tiny", "qwen2-tiny"] {
        check_greedy(name, false);
        // the same through memory-mapped f32 weights
        check_greedy(name, true);
    }
}

#[test]
fn cached_prefill_gives_the_training_logits() {
    for name in ["llama-tiny", "qwen2-tiny"] {
        let model = load(&fixture(name), true).unwrap();
        let expected = SafetensorsFile::open(&fixture(name).join("expected.safetensors")).unwrap();
        let (shape, ids) = read(&expected, "input_ids");
        let t = shape[1];
        let ids: Vec<u32> = ids[..t].iter().map(|&x| x as u32).collect();
        let (_, want) = read(&expected, "logits");
        let v = model.vocab_size();
        // prefill of 5, then one token at a time
        let mut cache = model.new_cache(t);
        let mut logits = Vec::new();
        model
            .forward_cached(&mut cache, &ids[..5], &mut logits, true)
            .unwrap();
        let mut all = logits.clone();
        for &id in &ids[5..] {
            model
                .forward_cached(&mut cache, &[id], &mut logits, false)
                .unwrap();
            all.extend_from_slice(&logits);
        }
        let d = max_abs_diff(&all, &want[..t * v]);
        assert!(d < 1e-4, "{name}: cached logits differ by {d}");
        let e = model
            .forward_cached(&mut cache, &[1], &mut logits, false)
            .unwrap_err();
        assert!(e.to_string().contains("context full"), "{e}");
    }
}
