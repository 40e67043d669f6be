//! The whole model against PyTorch + `transformers` (tests/fixtures/gpt2-tiny, made by
//! ../shared/bench/pytorch/make_reference.py): logits, loss, the gradient of every parameter,
//! and greedy generation through the KV cache.
//!
//! Tolerances (the fixture's README measures float32-vs-float64 differences of 3.5e-6 for
//! logits and 2.7e-7 for gradients): logits 1e-4 abs, loss 1e-5 abs, each gradient 1e-4
//! relative to its tensor's largest |value| (and 1e-5 abs), greedy ids exact.

use quill::io::hf::load;
use quill::io::safetensors::SafetensorsFile;
use quill::kernels::crossentropy::IGNORE;
use quill::kernels::matmul::Precision;
use quill::model::Activations;
use quill::model::{Batch, Model};
use quill::sample::{generate, Sampler, SamplingParams, Stop};
use std::path::PathBuf;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny")
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

/// The reference batch: (B, T, ids [B·T]).
fn input_ids(expected: &SafetensorsFile) -> (usize, usize, Vec<u32>) {
    let (shape, ids) = read(expected, "input_ids");
    (shape[0], shape[1], ids.iter().map(|&x| x as u32).collect())
}

#[test]
fn logits_loss_and_every_gradient_match_transformers() {
    let model = load(&fixture(), false).unwrap();
    let expected = SafetensorsFile::open(&fixture().join("expected.safetensors")).unwrap();
    let (b, t, ids) = input_ids(&expected);
    // HF convention: labels = input_ids, shifted inside the model; the last position has no target.
    let targets: Vec<u32> = (0..b * t)
        .map(|k| if k % t == t - 1 { IGNORE } else { ids[k + 1] })
        .collect();

    let mut acts = Activations::new(&model, b, t);
    model.forward(&mut acts, &ids).unwrap();
    let (_, want_logits) = read(&expected, "logits");
    let max_diff = acts
        .logits
        .iter()
        .zip(&want_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        );
    assert!(max_diff < 1e-4, "logits differ by {max_diff}");

    let (sum, count) = model.loss(&mut acts, &targets);
    let (_, want_loss) = read(&expected, "loss");
    let loss = sum / count as f64;
    assert!(
        (loss - want_loss[0] as f64).abs() < 1e-5,
        "loss {loss} vs {}",
        want_loss[0]
    );

    let mut grads = vec![0.0; model.num_params()];
    let (sum2, _) = model.backward(&mut acts, &mut grads, Batch::new(&ids, &targets, 1.0));
    assert!((sum2 - sum).abs() < 1e-9);
    let mut checked = 0;
    for spec in &model.layout.tensors {
        let (gshape, want) = read(&expected, &format!("grad.{}", spec.name));
        assert_eq!(gshape, spec.shape, "{}", spec.name);
        let got = spec.view.of(&grads);
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(
                0.0,
                |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
            );
        assert!(
            diff <= 1e-4 * scale.max(1e-3) || diff < 1e-5,
            "gradient of {} differs by {diff} (tensor max {scale})",
            spec.name
        );
        checked += 1;
    }
    // every tensor of model.safetensors has its reference gradient
    assert_eq!(
        checked,
        expected
            .names()
            .unwrap()
            .iter()
            .filter(|n| n.starts_with("grad."))
            .count()
    );
}

/// bf16 mixed precision (every product's operands rounded to bf16, f32 accumulation) against
/// the same float32 reference: within bf16's rounding (8 bits of mantissa, so about 0.4% per
/// operand): logits 2e-2 of their largest |value|, loss 1e-2, every gradient 5e-2 of its
/// tensor's largest |value| with a cosine similarity above 0.999. The logits must also differ
/// from quill's own f32 logits, so the bf16 path is the one being checked.
#[test]
fn bf16_mixed_precision_tracks_transformers() {
    let mut model = load(&fixture(), false).unwrap();
    let expected = SafetensorsFile::open(&fixture().join("expected.safetensors")).unwrap();
    let (b, t, ids) = input_ids(&expected);
    let targets: Vec<u32> = (0..b * t)
        .map(|k| if k % t == t - 1 { IGNORE } else { ids[k + 1] })
        .collect();
    let mut acts = Activations::new(&model, b, t);
    model.forward(&mut acts, &ids).unwrap();
    let f32_logits = acts.logits.clone();
    model.precision = Precision::Bf16;
    model.forward(&mut acts, &ids).unwrap();
    let (_, want_logits) = read(&expected, "logits");
    let scale = want_logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = max_abs_diff(&acts.logits, &want_logits);
    assert!(d < 2e-2 * scale, "bf16 logits differ by {d} (max {scale})");
    assert!(
        max_abs_diff(&acts.logits, &f32_logits) > 1e-6,
        "bf16 made no difference"
    );
    let (sum, count) = model.loss(&mut acts, &targets);
    let (_, want_loss) = read(&expected, "loss");
    let loss = sum / count as f64;
    assert!(
        (loss - want_loss[0] as f64).abs() < 1e-2,
        "bf16 loss {loss} vs {}",
        want_loss[0]
    );
    let mut grads = vec![0.0; model.num_params()];
    model.backward(&mut acts, &mut grads, Batch::new(&ids, &targets, 1.0));
    for spec in &model.layout.tensors {
        let (_, want) = read(&expected, &format!("grad.{}", spec.name));
        check_bf16_gradient(&spec.name, spec.view.of(&grads), &want);
    }
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

/// A bf16 gradient against the f32 reference: 5e-2 of the tensor's largest |value| and a
/// cosine similarity above 0.999 (tensors whose reference is all but zero are skipped).
fn check_bf16_gradient(name: &str, got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if scale < 1e-6 {
        return;
    }
    let d = max_abs_diff(got, want);
    assert!(
        d <= 5e-2 * scale,
        "bf16 gradient of {name} differs by {d} (tensor max {scale})"
    );
    let dot: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    let na: f64 = got.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = want.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    let cos = dot / (na * nb);
    assert!(cos > 0.999, "bf16 gradient of {name}: cosine {cos}");
}

#[test]
fn greedy_generation_with_kv_cache_matches_transformers() {
    // the training layout, and the transposed layout opened for generation
    check_greedy(load(&fixture(), false).unwrap());
    let opened = load(&fixture(), true).unwrap();
    assert!(opened.is_transposed());
    check_greedy(opened);
}

fn check_greedy(model: Model) {
    let expected = SafetensorsFile::open(&fixture().join("expected.safetensors")).unwrap();
    let (_, greedy) = read(&expected, "greedy_ids");
    let greedy: Vec<u32> = greedy.iter().map(|&x| x as u32).collect();
    let (_, want_logits) = read(&expected, "greedy_logits");
    let n_new = want_logits.len() / model.vocab_size();
    let prompt = &greedy[..greedy.len() - n_new];
    let params = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let mut sampler = Sampler::new(params).unwrap();
    let out = generate(
        &model,
        prompt,
        Stop {
            max_new: n_new,
            eos: &[],
        },
        &mut sampler,
        |_| {},
        |_| Ok(true),
    )
    .unwrap();
    assert_eq!(out, greedy[prompt.len()..]);

    // the cached logits at every step match transformers' too
    let v = model.vocab_size();
    let mut cache = model.new_cache(64);
    let mut logits = Vec::new();
    model
        .forward_cached(&mut cache, prompt, &mut logits, false)
        .unwrap();
    for i in 0..n_new {
        let want = &want_logits[i * v..(i + 1) * v];
        let diff = logits
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(
                0.0,
                |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
            );
        assert!(diff < 1e-4, "step {i}: cached logits differ by {diff}");
        model
            .forward_cached(&mut cache, &[out[i]], &mut logits, false)
            .unwrap();
    }
}

/// Gradient accumulation is a sum of scaled micro-batch gradients: two micro-batches of one
/// sequence with scale 1/2 give the gradient of the two-sequence batch (equal token counts).
#[test]
fn accumulated_micro_batches_equal_the_full_batch() {
    let model = load(&fixture(), false).unwrap();
    let expected = SafetensorsFile::open(&fixture().join("expected.safetensors")).unwrap();
    let (b, t, ids) = input_ids(&expected);
    let targets: Vec<u32> = (0..b * t)
        .map(|k| if k % t == t - 1 { IGNORE } else { ids[k + 1] })
        .collect();
    let mut full = vec![0.0; model.num_params()];
    let mut acts = Activations::new(&model, b, t);
    model.forward(&mut acts, &ids).unwrap();
    model.backward(&mut acts, &mut full, Batch::new(&ids, &targets, 1.0));
    let mut accum = vec![0.0; model.num_params()];
    let mut one = Activations::new(&model, 1, t);
    for r in 0..b {
        let (i, tg) = (&ids[r * t..(r + 1) * t], &targets[r * t..(r + 1) * t]);
        model.forward(&mut one, i).unwrap();
        model.backward(&mut one, &mut accum, Batch::new(i, tg, 1.0 / b as f32));
    }
    let scale = full.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = full
        .iter()
        .zip(&accum)
        .map(|(a, b)| (a - b).abs())
        .fold(
            0.0,
            |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
        );
    assert!(
        diff < 1e-5 * scale.max(1.0),
        "accumulated gradient differs by {diff}"
    );
}

/// Generation stops at the end-of-text token, and runs past the context by rebuilding the
/// cache from the most recent tokens.
#[test]
fn generation_stops_at_eos_and_continues_past_the_context() {
    let model = load(&fixture(), false).unwrap();
    let expected = SafetensorsFile::open(&fixture().join("expected.safetensors")).unwrap();
    let (_, greedy) = read(&expected, "greedy_ids");
    let greedy: Vec<u32> = greedy.iter().map(|&x| x as u32).collect();
    let prompt = &greedy[..4];
    let greedy_params = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    // transformers' greedy continuation is 91, 91, ...: with 91 as end-of-text, one token
    let mut sampler = Sampler::new(greedy_params.clone()).unwrap();
    let out = generate(
        &model,
        prompt,
        Stop {
            max_new: 20,
            eos: &[greedy[4]],
        },
        &mut sampler,
        |_| {},
        |_| Ok(true),
    )
    .unwrap();
    assert_eq!(out, vec![greedy[4]]);

    // 150 tokens from a 64-position model: the context shifts, generation goes on
    let mut shifts = 0;
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 1.0,
        ..Default::default()
    })
    .unwrap();
    let out = generate(
        &model,
        prompt,
        Stop {
            max_new: 150,
            eos: &[],
        },
        &mut sampler,
        |e| {
            if let quill::sample::GenerateEvent::ContextShifted { kept } = e {
                assert_eq!(kept, 32);
                shifts += 1;
            }
        },
        |_| Ok(true),
    )
    .unwrap();
    assert_eq!(out.len(), 150);
    assert!(shifts >= 3, "{shifts} shifts");
    assert!(out.iter().all(|&t| (t as usize) < model.vocab_size()));
}

/// OpenAI's original GPT-2 upload names tensors without the `transformer.` prefix
/// (GPT2Model); such a folder loads with the same logits.
#[test]
fn bare_tensor_names_load_the_same_model() {
    let model = load(&fixture(), false).unwrap();
    let dir = std::env::temp_dir().join(format!("quill-bare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    let names: Vec<String> = model
        .layout
        .tensors
        .iter()
        .map(|t| t.name.trim_start_matches("transformer.").to_string())
        .collect();
    let tensors: Vec<(&str, &[usize], &[f32])> = model
        .layout
        .tensors
        .iter()
        .zip(&names)
        .map(|(t, n)| (n.as_str(), t.shape.as_slice(), t.view.of(&model.params)))
        .collect();
    quill::io::safetensors::write_f32(
        &dir.join("model.safetensors"),
        &tensors,
        &Default::default(),
    )
    .unwrap();
    let bare = load(&dir, false).unwrap();
    assert_eq!(bare.params, model.params);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `sample::score` gives each token's log-probability given the tokens before it: over the
/// fixture's rows (equal lengths), the mean of the rows' mean losses is transformers' loss.
#[test]
fn score_matches_transformers_loss() {
    let model = load(&fixture(), true).unwrap();
    let expected = SafetensorsFile::open(&fixture().join("expected.safetensors")).unwrap();
    let (b, t, ids) = input_ids(&expected);
    let ones = vec![1u32; model.vocab_size()];
    let mut total = 0.0;
    for r in 0..b {
        let s = quill::sample::score(&model, &ids[r * t..(r + 1) * t], &ones).unwrap();
        assert_eq!(s.tokens.len(), t - 1);
        let nats: f64 = -s.tokens.iter().map(|x| x.1).sum::<f64>();
        assert!((s.bits_per_byte - nats / std::f64::consts::LN_2 / (t - 1) as f64).abs() < 1e-9);
        total += s.mean_loss;
    }
    let (_, want) = read(&expected, "loss");
    let got = total / b as f64;
    assert!((got - want[0] as f64).abs() < 1e-5, "{got} vs {}", want[0]);
}

/// A bf16 or f16 GPT-2 folder opened for generation keeps every matrix in its stored half
/// precision, the input-major block matrices (Conv1D, `[in, out]`) included: they are turned
/// to `[out, in]` still in 2 bytes a weight, so decoding reads half of f32's bytes. The
/// prompt's and each decoded token's logits equal those of the same rounded weights read
/// into f32 (the training layout, itself checked against transformers above). (Prompts past
/// 64 rows on CPUs with `vdpbf16ps` round their rows to bf16: `linear`'s tests check them.)
#[test]
fn half_precision_folders_decode_from_their_stored_halves() {
    use quill::kernels::linear::MatRef;
    use safetensors::tensor::{Dtype, TensorView};
    let model = load(&fixture(), false).unwrap();
    for (dtype, tag) in [(Dtype::BF16, "bf16"), (Dtype::F16, "f16")] {
        let dir = std::env::temp_dir().join(format!("quill-half-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
        let bytes: Vec<Vec<u8>> = model
            .layout
            .tensors
            .iter()
            .map(|t| {
                let v = t.view.of(&model.params);
                v.iter()
                    .flat_map(|&x| match dtype {
                        Dtype::BF16 => half::bf16::from_f32(x).to_le_bytes(),
                        _ => half::f16::from_f32(x).to_le_bytes(),
                    })
                    .collect()
            })
            .collect();
        let views: Vec<(String, TensorView)> = model
            .layout
            .tensors
            .iter()
            .zip(&bytes)
            .map(|(t, b)| {
                (
                    t.name.clone(),
                    TensorView::new(dtype, t.shape.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();

        let mut mapped = load(&dir, true).unwrap();
        let rounded = load(&dir, false).unwrap();
        let mut halves = 0;
        let params = std::mem::take(&mut mapped.params);
        mapped.for_each_weight(|w| {
            let half = matches!(w.mat(&params), MatRef::Bf16(_) | MatRef::F16(_));
            assert!(half, "a {}x{} matrix was read into f32", w.rows, w.cols);
            halves += 1;
        });
        mapped.params = params;
        assert!(halves > 2 * 4, "{halves} matrices");

        let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 255) as u32).collect();
        let (prompt, rest) = ids.split_at(24);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let (mut ca, mut cb) = (mapped.new_cache(64), rounded.new_cache(64));
        for (step, chunk) in std::iter::once(prompt).chain(rest.chunks(1)).enumerate() {
            mapped.forward_cached(&mut ca, chunk, &mut a, true).unwrap();
            rounded
                .forward_cached(&mut cb, chunk, &mut b, true)
                .unwrap();
            let d = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(
                    0.0,
                    |m, d| if d.is_nan() { f32::INFINITY } else { m.max(d) },
                );
            assert!(d < 1e-4, "{tag} step {step}: logits differ by {d}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
