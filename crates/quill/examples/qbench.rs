//! Times quantized products y = x · Wᵀ at a prompt's batch on SmolLM2-135M's shapes, per
//! GGUF type: `cargo run --release --example qbench -- [ROWS]` (ROWS of x, default 512).
use quill::kernels::linear::{quant_linear, QPart};
use quill::kernels::quant::{quantize::quantize, QType};
use quill::rng::Rng;
use std::time::Instant;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROWS"))
        .unwrap_or(512);
    let shapes = [(576usize, 576usize), (576, 192), (576, 1536), (1536, 576)];
    let mut rng = Rng::new(1);
    for t in [
        QType::Q8_0,
        QType::Q4_0,
        QType::Q4_1,
        QType::Q5_0,
        QType::Q4K,
        QType::Q6K,
    ] {
        let mut total = 0.0;
        let mut flops = 0.0;
        for &(inp, out) in shapes.iter().filter(|s| s.0 % t.block() == 0) {
            let w: Vec<f32> = (0..inp * out).map(|_| rng.uniform() as f32 - 0.5).collect();
            let mut bytes = Vec::new();
            quantize(t, &w, &mut bytes);
            let x: Vec<f32> = (0..n * inp).map(|_| rng.uniform() as f32 - 0.5).collect();
            let mut y = vec![0.0f32; n * out];
            let part = [QPart {
                bytes: &bytes,
                qtype: t,
            }];
            quant_linear(&mut y, out, &x, inp, &part);
            let reps = 5;
            let s = Instant::now();
            for _ in 0..reps {
                quant_linear(&mut y, out, &x, inp, &part);
            }
            total += s.elapsed().as_secs_f64() / reps as f64;
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
