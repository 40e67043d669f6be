//! Decoding products (one row of x) on SmolLM2-135M's shapes: the row-by-row AVX2 kernel on
//! the file's layout against the eight-row groups of `quant::x8`, one thread, the fastest of
//! many calls: `cargo run --release -p quill --example x8bench`.
use quill::kernels::quant::dot::{dot_one_row, isa, QuantRows};
use quill::kernels::quant::quantize::quantize;
use quill::kernels::quant::x8;
use quill::rng::Rng;
use std::time::Instant;

fn best(mut f: impl FnMut()) -> f64 {
    let mut b = f64::INFINITY;
    for _ in 0..400 {
        let s = Instant::now();
        f();
        b = b.min(s.elapsed().as_secs_f64());
    }
    b
}

fn main() {
    let shapes = [(576usize, 576usize), (576, 192), (576, 1536), (1536, 576)];
    let mut rng = Rng::new(1);
    let path = isa();
    for t in x8::TYPES {
        let (mut a, mut b) = (0.0, 0.0);
        for &(inp, out) in shapes.iter().filter(|s| s.0 % t.block() == 0) {
            let w: Vec<f32> = (0..inp * out).map(|_| rng.uniform() as f32 - 0.5).collect();
            let mut bytes = Vec::new();
            quantize(t, &w, &mut bytes);
            let packed = x8::pack(t, &bytes, out, inp);
            let x: Vec<f32> = (0..inp).map(|_| rng.uniform() as f32 - 0.5).collect();
            let mut xq = QuantRows::default();
            xq.quantize(&x, inp);
            let mut y = vec![0.0f32; out];
            a += best(|| dot_one_row(path, t, &bytes, out, &xq, &mut y));
            let gb = bytes.len() / out * x8::ROWS;
            b += best(|| {
                for (g, yg) in packed.chunks_exact(gb).zip(y.chunks_exact_mut(x8::ROWS)) {
                    x8::dot_group(true, t, g, &xq, yg, x8::ROWS);
                }
            });
        }
        println!(
            "{:<5} rows {:.3} ms   groups of 8 {:.3} ms   {:.2}x",
            t.name(),
            a * 1e3,
            b * 1e3,
            a / b
        );
    }
}
