//! Fine-tuning batches against PyTorch + `transformers` (tests/fixtures/*/packed.safetensors,
//! made by scripts/fixtures/make_packed_reference.py): rows that pack several examples and
//! padding, each example's prompt masked. `transformers` runs each example alone with labels
//! -100 on its prompt; quill runs the packed batch through `forward_packed` (positions
//! restart and attention stays inside each example) and `backward`. The loss (1e-5) and the
//! gradient of every parameter (1e-4 of its tensor's largest |value|) must agree.

use quill::io::hf::load;
use quill::io::safetensors::SafetensorsFile;
use quill::kernels::crossentropy::IGNORE;
use quill::model::{Activations, Batch, Model};
mod common;
use common::{fixture, max_abs, max_diff, read, stored_gradients};

fn check(name: &str) {
    let f = SafetensorsFile::open(&fixture(name).join("packed.safetensors")).unwrap();
    let (shape, ids) = read(&f, "input_ids");
    let (b, t) = (shape[0], shape[1]);
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let starts: Vec<u32> = read(&f, "starts").1.iter().map(|&x| x as u32).collect();
    let targets: Vec<u32> = read(&f, "targets")
        .1
        .iter()
        .map(|&x| if x < 0.0 { IGNORE } else { x as u32 })
        .collect();
    assert!(starts
        .iter()
        .enumerate()
        .any(|(r, &s)| s as usize != 0 && r % t != 0));
    let model = load(&fixture(name), false).unwrap();
    // with the logits of every row, and of the learned rows only
    for only in [false, true] {
        check_pass(name, (&model, &f), (&ids, &starts, &targets), (b, t), only);
    }
}

fn check_pass(
    name: &str,
    (model, f): (&Model, &SafetensorsFile),
    (ids, starts, targets): (&[u32], &[u32], &[u32]),
    (b, t): (usize, usize),
    only: bool,
) {
    let mut acts = Activations::new(model, b, t);
    if only {
        acts.logits_where_counted(targets);
    }
    model.forward_packed(&mut acts, ids, starts).unwrap();
    let mut grads = vec![0.0; model.num_params()];
    let (sum, count) = model.backward(&mut acts, &mut grads, Batch::new(ids, targets, 1.0));
    let want_loss = read(f, "loss").1[0];
    let loss = sum / count as f64;
    assert!(
        (loss - want_loss).abs() < 1e-5,
        "{name}: loss {loss} vs {want_loss}"
    );
    let mut checked = 0;
    for spec in &model.layout.tensors {
        let (gshape, want) = read(f, &format!("grad.{}", spec.name));
        assert_eq!(gshape, spec.shape, "{}", spec.name);
        let got = spec.view.of(&grads);
        let scale = max_abs(&want);
        let diff = max_diff(got, &want);
        assert!(
            diff <= 1e-4 * scale.max(1e-3) || diff < 1e-5,
            "{name}: gradient of {} differs by {diff} (tensor max {scale})",
            spec.name
        );
        checked += 1;
    }
    assert_eq!(
        checked,
        stored_gradients(f),
        "{name}: every stored gradient is checked"
    );
}

#[test]
fn packed_masked_batches_match_transformers_on_each_example_alone() {
    for name in ["llama-tiny", "qwen2-tiny", "gpt2-tiny"] {
        check(name);
    }
}

#[test]
fn bad_document_starts_are_refused() {
    let model = load(&fixture("llama-tiny"), false).unwrap();
    let mut acts = Activations::new(&model, 1, 4);
    let ids = [1, 2, 3, 4];
    for starts in [[0, 0, 3, 2], [1, 1, 1, 1], [0, 0, 1, 1]] {
        assert!(
            model.forward_packed(&mut acts, &ids, &starts).is_err(),
            "{starts:?}"
        );
    }
    assert!(model.forward_packed(&mut acts, &ids, &[0, 0]).is_err());
    model
        .forward_packed(&mut acts, &ids, &[0, 1, 1, 3])
        .unwrap();
}
