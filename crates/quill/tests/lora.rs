//! LoRA adapters against PyTorch + `transformers` + `peft` (tests/fixtures/{llama,qwen2}-tiny/
//! lora and lora_expected.safetensors, made by scripts/fixtures/make_lora_reference.py): an
//! adapter PEFT saved, read by quill; on a packed, prompt-masked batch, the loss (1e-5) and
//! the gradient of every adapter matrix (1e-4 of its tensor's largest |value|); the adapted
//! model's logits through the adapters (unmerged) and through merged weights (1e-4); and the
//! gradients against central finite differences of quill's own loss.

use quill::io::hf::load;
use quill::io::safetensors::SafetensorsFile;
use quill::kernels::crossentropy::IGNORE;
use quill::model::lora::{Lora, LoraActs};
use quill::model::{Activations, Batch, Model};
mod common;
use common::{fixture, max_abs, max_diff, read, stored_gradients};
use std::sync::Arc;

struct Case {
    model: Model,
    lora: Lora,
    expected: SafetensorsFile,
    ids: Vec<u32>,
    starts: Vec<u32>,
    targets: Vec<u32>,
    b: usize,
    t: usize,
}

fn case(name: &str) -> Case {
    let model = load(&fixture(name), false).unwrap();
    let lora = quill::io::peft::load(&fixture(name).join("lora"), &model).unwrap();
    let expected = SafetensorsFile::open(&fixture(name).join("lora_expected.safetensors")).unwrap();
    let (shape, ids) = read(&expected, "input_ids");
    let to_u32 = |v: Vec<f64>| -> Vec<u32> {
        v.iter()
            .map(|&x| if x < 0.0 { IGNORE } else { x as u32 })
            .collect()
    };
    Case {
        ids: to_u32(ids),
        starts: to_u32(read(&expected, "starts").1),
        targets: to_u32(read(&expected, "targets").1),
        b: shape[0],
        t: shape[1],
        model,
        lora,
        expected,
    }
}

/// (loss, adapter gradients) of quill's packed pass.
fn pass(c: &Case, lora: &Lora) -> (f64, Vec<f32>) {
    pass_with(c, lora, false)
}

/// [`pass`], with the head computing only the learned rows' logits when `counted_only`.
fn pass_with(c: &Case, lora: &Lora, counted_only: bool) -> (f64, Vec<f32>) {
    let mut acts = Activations::new(&c.model, c.b, c.t);
    if counted_only {
        acts.logits_where_counted(&c.targets);
    }
    let mut la = LoraActs::new(lora, c.b * c.t);
    c.model
        .forward_lora(&mut acts, &c.ids, Some(&c.starts), (lora, &mut la))
        .unwrap();
    let mut grads = vec![0.0; lora.params.len()];
    let batch = Batch::new(&c.ids, &c.targets, 1.0);
    let (sum, count) = c
        .model
        .backward_lora(&mut acts, (lora, &mut la), &mut grads, batch);
    (sum / count as f64, grads)
}

#[test]
fn lora_loss_gradients_and_logits_match_peft() {
    for name in ["llama-tiny", "qwen2-tiny"] {
        let c = case(name);
        assert_eq!(c.lora.config.rank, 4);
        assert_eq!(c.lora.adapters.len(), 7 * c.model.blocks.len());
        // with the logits of every row, and of the learned rows only
        for counted_only in [false, true] {
            let (loss, grads) = pass_with(&c, &c.lora, counted_only);
            let want = read(&c.expected, "loss").1[0];
            assert!((loss - want).abs() < 1e-5, "{name}: loss {loss} vs {want}");
            let mut checked = 0;
            for spec in &c.lora.layout.tensors {
                let (shape, want) = read(&c.expected, &format!("grad.{}", spec.name));
                assert_eq!(shape, spec.shape, "{}", spec.name);
                let got = spec.view.of(&grads);
                let scale = max_abs(&want);
                assert!(scale > 1e-6, "{name}: {} has a zero gradient", spec.name);
                let diff = max_diff(got, &want);
                assert!(
                    diff <= 1e-4 * scale,
                    "{name}: gradient of {} differs by {diff} (tensor max {scale})",
                    spec.name
                );
                checked += 1;
            }
            assert_eq!(checked, stored_gradients(&c.expected));
        }

        // logits of the adapted model: through the adapters, and through merged weights
        let (_, want) = read(&c.expected, "logits");
        let ids = &c.ids[..c.t];
        let mut acts = Activations::new(&c.model, 1, c.t);
        let mut la = LoraActs::new(&c.lora, c.t);
        c.model
            .forward_lora(&mut acts, ids, None, (&c.lora, &mut la))
            .unwrap();
        let d = max_diff(&acts.logits, &want);
        assert!(d < 1e-4, "{name}: unmerged logits differ by {d}");
        let mut merged = load(&fixture(name), false).unwrap();
        c.lora.merge_into(&mut merged).unwrap();
        let merged_logits = merged.logits_all(ids).unwrap();
        let d = max_diff(&merged_logits, &want);
        assert!(d < 1e-4, "{name}: merged logits differ by {d}");
        // and through the adapters beside the weights at inference (unmerged)
        let mut beside = load(&fixture(name), false).unwrap();
        beside.adapters = Some(Arc::new(c.lora.clone()));
        let d = max_diff(&beside.logits_all(ids).unwrap(), &want);
        assert!(d < 1e-4, "{name}: unmerged inference logits differ by {d}");
        // and the base model's are not these
        let base = c.model.logits_all(ids).unwrap();
        assert!(base
            .iter()
            .zip(&want)
            .any(|(a, b)| (*a as f64 - b).abs() > 1e-2));
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    // central differences of quill's own loss (f32 passes, f64 sum): step 1e-2 on
    // parameters of about 0.1, noise about 1e-4; checked to 2e-3 of each tensor's largest
    // gradient on a spread of coordinates of every tensor
    let c = case("llama-tiny");
    let (_, grads) = pass(&c, &c.lora);
    let h = 1e-2f32;
    for spec in &c.lora.layout.tensors {
        let g = spec.view.of(&grads);
        let scale = g.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        for j in (0..spec.view.len).step_by(spec.view.len / 5 + 1) {
            let i = spec.view.offset + j;
            let mut l = c.lora.clone();
            l.params[i] += h;
            let up = pass(&c, &l).0;
            l.params[i] -= 2.0 * h;
            let down = pass(&c, &l).0;
            let fd = (up - down) / (2.0 * h as f64);
            assert!(
                (fd - g[j] as f64).abs() <= 2e-3 * scale.max(1e-3),
                "{}[{j}]: finite difference {fd} vs {}",
                spec.name,
                g[j]
            );
        }
    }
}

#[test]
fn bad_adapters_are_refused() {
    let model = load(&fixture("llama-tiny"), false).unwrap();
    // an adapter for another base: qwen2-tiny's shapes differ
    let other = fixture("qwen2-tiny").join("lora");
    let llama = fixture("llama-tiny").join("lora");
    let qwen = load(&fixture("qwen2-tiny"), false).unwrap();
    let same_shapes = qwen.width == model.width && qwen.mlp_width == model.mlp_width;
    if !same_shapes {
        let e = quill::io::peft::load(&other, &model)
            .unwrap_err()
            .to_string();
        assert!(e.contains("another base") || e.contains("no tensor"), "{e}");
    }
    assert!(quill::io::peft::load(&llama, &model).is_ok());
    // ranks of 0 and beyond a projection's side; a GPT-2
    use quill::model::lora::{LoraConfig, ALL_TARGETS};
    let cfg = |rank| LoraConfig {
        rank,
        alpha: 8.0,
        dropout: 0.0,
        targets: ALL_TARGETS.to_vec(),
        rslora: false,
        plus_ratio: 1.0,
    };
    for r in [0, 10_000] {
        let e = Lora::new(&model, cfg(r)).unwrap_err().to_string();
        assert!(e.contains("rank"), "{e}");
    }
    let gpt2 = load(&fixture("gpt2-tiny"), false).unwrap();
    assert!(Lora::new(&gpt2, cfg(4))
        .unwrap_err()
        .to_string()
        .contains("GPT-2"));
}

/// llama-tiny or qwen2-tiny with every matrix quantized (block matrices in Q4_0 and Q5_1, the
/// embedding, head and MLP matrices in Q8_0; tied in qwen2-tiny), its f32 buffer's copies
/// poisoned with NaN, and its twin holding the dequantized numbers in f32.
fn quantized_pair(name: &str) -> (Model, Model) {
    use quill::kernels::quant::{dequantize, quantize::quantize, x8, QType};
    use quill::model::weight::{QBytes, Storage};
    let mut quantized = load(&fixture(name), false).unwrap();
    let mut twin = load(&fixture(name), false).unwrap();
    let params = quantized.params.clone();
    let mut done: Vec<(quill::model::View, Storage, Vec<u8>)> = Vec::new();
    let mut kinds = 0;
    quantized.for_each_weight(|w| {
        if let Some((_, s, _)) = done.iter().find(|(v, _, _)| *v == w.view) {
            w.storage = s.clone();
            return;
        }
        let big = w.rows * w.cols >= 64 * 128;
        let qtype = match (big, kinds % 2) {
            (true, _) => QType::Q8_0,
            (false, 0) => QType::Q4_0,
            _ => QType::Q5_1,
        };
        kinds += 1;
        let mut bytes = Vec::new();
        assert!(quantize(qtype, w.view.of(&params), &mut bytes));
        // Q4_0 interleaved by eight rows (as the AVX2 path keeps it), whatever this CPU
        let x8 = x8::packable(qtype) && w.rows >= x8::ROWS;
        let kept = match x8 {
            true => x8::pack(qtype, &bytes, w.rows, w.cols),
            false => bytes.clone(),
        };
        let storage = Storage::Quant {
            bytes: QBytes::Owned(Arc::new(kept)),
            qtype,
            x8,
        };
        w.storage = storage.clone();
        done.push((w.view, storage, bytes));
    });
    for (view, storage, bytes) in &done {
        let Storage::Quant { qtype, .. } = storage else {
            unreachable!()
        };
        dequantize(*qtype, bytes, view.of_mut(&mut twin.params));
        // the quantized model's f32 copy is never read
        view.of_mut(&mut quantized.params).fill(f32::NAN);
    }
    assert!(quantized.is_mapped() && quantized.is_quantized() && !twin.is_mapped());
    (quantized, twin)
}

/// A LoRA base that stays quantized (as a GGUF file's does): the loss and every adapter
/// gradient equal those on its dequantized twin, whose f32 buffer holds the same numbers;
/// and at inference, the adapters beside the quantized weights give the merged twin's
/// logits up to the quantized kernels' rounding.
#[test]
fn lora_on_a_quantized_base_equals_its_dequantized_twin() {
    for name in ["llama-tiny", "qwen2-tiny"] {
        let c = case(name);
        let (quantized, twin) = quantized_pair(name);
        // (the quantized head computing only the learned rows' logits)
        let (q_loss, q_grads) = pass_with(
            &Case {
                model: quantized,
                ..case(name)
            },
            &c.lora,
            true,
        );
        let (t_loss, t_grads) = pass(
            &Case {
                model: twin,
                ..case(name)
            },
            &c.lora,
        );
        assert!(q_loss.is_finite());
        assert!(
            (q_loss - t_loss).abs() < 1e-6 * t_loss.abs(),
            "{name}: loss {q_loss} vs the twin's {t_loss}"
        );
        // and the quantization moved the loss: the twin is not the f32 fixture
        let (f_loss, _) = pass(&c, &c.lora);
        assert!(
            (f_loss - t_loss).abs() > 1e-6,
            "{name}: quantization changed nothing"
        );
        for spec in &c.lora.layout.tensors {
            let (got, want) = (spec.view.of(&q_grads), spec.view.of(&t_grads));
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            let diff = max_diff(got, &want);
            assert!(
                diff <= 1e-5 * scale,
                "{name}: gradient of {} differs by {diff} (tensor max {scale})",
                spec.name
            );
        }

        let ids = &c.ids[..c.t];
        let (mut quantized, mut merged) = quantized_pair(name);
        quantized.adapters = Some(Arc::new(c.lora.clone()));
        let got = quantized.logits_all(ids).unwrap();
        let base = merged.logits_all(ids).unwrap();
        c.lora.merge_into(&mut merged).unwrap();
        let want: Vec<f64> = merged
            .logits_all(ids)
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        let (d, effect) = (max_diff(&got, &want), max_diff(&base, &want));
        eprintln!("{name}: quantized + unmerged vs merged twin {d}, the adapters' effect {effect}");
        assert!(
            d < 1e-3 * effect && d < 5e-3,
            "{name}: {d} vs the adapters' effect {effect}"
        );
    }
}
