//! Times the kernels of one training step of a small GPT-2 in isolation:
//! `cargo run --release --example kbench -- WIDTH HEADS CONTEXT BATCH`.
use quill::kernels::attention;
use quill::kernels::matmul::{matmul, Accumulate, Operand, Precision};
use std::time::Instant;

fn time(name: &str, flops: f64, reps: usize, mut f: impl FnMut()) {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{name:<28} {:>8.3} ms  {:>7.1} GFLOP/s",
        s * 1e3,
        flops / s / 1e9
    );
}

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let (c, h, t, b) = (a[0], a[1], a[2], a[3]);
    let n = b * t;
    let x = vec![0.01f32; n * 4 * c];
    let w = vec![0.01f32; (16 * c * c).max(n * 4 * c)];
    let mut y = vec![0.0f32; n * 4 * c];
    for (name, k, m) in [
        ("qkv  N x C x 3C", c, 3 * c),
        ("proj N x C x C", c, c),
        ("fc   N x C x 4C", c, 4 * c),
        ("fc2  N x 4C x C", 4 * c, c),
    ] {
        time(name, 2.0 * (n * k * m) as f64, 20, || {
            matmul(
                Precision::F32,
                &mut y,
                Operand::new(&x, n, k),
                Operand::new(&w, k, m),
                Accumulate::Overwrite,
            )
        });
        time("  dX = dY Wt", 2.0 * (n * k * m) as f64, 20, || {
            matmul(
                Precision::F32,
                &mut y,
                Operand::new(&x, n, m),
                Operand::new(&w, k, m).t(),
                Accumulate::Overwrite,
            )
        });
        time("  dW = Xt dY", 2.0 * (n * k * m) as f64, 20, || {
            matmul(
                Precision::F32,
                &mut y,
                Operand::new(&x, n, k).t(),
                Operand::new(&w, n, m),
                Accumulate::Add,
            )
        });
    }
    let qkv = vec![0.01f32; n * 3 * c];
    let mut out = vec![0.0f32; n * c];
    let hs = attention::Heads::mha(c, h);
    let mut lse = vec![0.0f32; b * h * t];
    let mut scratch = vec![0.0f32; attention::scratch_len(b, t, hs)];
    let mut dqkv = vec![0.0f32; n * 3 * c];
    for prec in [Precision::F32, Precision::Bf16] {
        let aflops = 4.0 * (b * t * t * c) as f64;
        time(&format!("attention fwd {prec:?}"), aflops, 20, || {
            attention::forward(
                attention::Layer {
                    b,
                    t,
                    heads: hs,
                    scale: 0.1,
                    precision: prec,
                    starts: None,
                },
                &mut out,
                &mut lse,
                &mut scratch,
                &qkv,
            )
        });
        let dout = vec![0.01f32; n * c];
        time(&format!("attention bwd {prec:?}"), 2.0 * aflops, 20, || {
            attention::backward(
                attention::Layer {
                    b,
                    t,
                    heads: hs,
                    scale: 0.1,
                    precision: prec,
                    starts: None,
                },
                &mut dqkv,
                &mut scratch,
                &dout,
                attention::Saved {
                    qkv: &qkv,
                    out: &out,
                    lse: &lse,
                },
            )
        });
    }
}
