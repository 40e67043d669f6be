//! Times quantized products y = x · Wᵀ at a prompt's batch on SmolLM2-135M's shapes, per
//! GGUF type: `cargo run --release --example qbench -- [ROWS]` (ROWS of x, default 512), the
//! fastest of many calls per shape; `-- ROWS TYPE` times one type only.
use quill::kernels::linear::{quant_linear, QPart};
use quill::kernels::quant::{quantize::quantize, x8, QType};
use quill::rng::Rng;
use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROWS"))
        .unwrap_or(512);
    let only = std::env::args().nth(2);
    let shapes = [(576usize, 576usize), (576, 192), (576, 1536), (1536, 576)];
    let mut rng = Rng::new(1);
    for t in [
        QType::Q8_0,
        QType::Q4_0,
        QType::Q4_1,
        QType::Q5_0,
        QType::Q4K,
        QType::Q6K,
    ]
    .into_iter()
    .filter(|t| {
        only.as_deref()
            .is_none_or(|o| o.eq_ignore_ascii_case(t.name()))
    }) {
        let mut total = 0.0;
        let mut flops = 0.0;
        for &(inp, out) in shapes.iter().filter(|s| s.0 % t.block() == 0) {
            let w: Vec<f32> = (0..inp * out).map(|_| rng.uniform() as f32 - 0.5).collect();
            let mut bytes = Vec::new();
            quantize(t, &w, &mut bytes);
            let x: Vec<f32> = (0..n * inp).map(|_| rng.uniform() as f32 - 0.5).collect();
            let mut y = vec![0.0f32; n * out];
            // the layout a model opened here keeps
            let x8 = x8::wanted(t);
            if x8 {
                bytes = x8::pack(t, &bytes, out, inp);
            }
            let part = [QPart {
                bytes: &bytes,
                qtype: t,
                x8,
            }];
            quant_linear(&mut y, out, &x, inp, &part);
            // the fastest of many calls: other work on the machine only ever adds time
            let reps = (2000 / n).max(5);
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let s = Instant::now();
                quant_linear(&mut y, out, &x, inp, &part);
                best = best.min(s.elapsed().as_secs_f64());
            }
            total += best;
            flops += 2.0 * (n * inp * out) as f64;
        }
        println!(
            "{:<6} {:>8.3} ms {:>7.1} GFLOP/s",
            t.name(),
            total * 1e3,
            flops / total / 1e9
        );
    }
}
