//! f32 (`gemm`) against quill's bf16 product on the shapes the training configs use:
//! `cargo run --release -p quill --example bfbench [shape index, to profile one]`.
use quill::kernels::matmul::{self, Accumulate, Operand, Precision};
use std::time::Instant;
fn main() {
    let shapes: &[(usize, usize, usize, bool, bool)] = &[
        (2048, 384, 1152, false, false),
        (2048, 384, 384, false, false),
        (2048, 384, 1536, false, false),
        (2048, 1536, 384, false, false),
        (2048, 384, 65, false, true),
        (2048, 1152, 384, false, true),
        (2048, 1536, 384, false, true),
        (384, 2048, 1152, true, false),
        (1536, 2048, 384, true, false),
        (2048, 65, 384, false, false),
        (1024, 768, 2304, false, false),
        (768, 1024, 3072, true, false),
        (1024, 3072, 768, false, true),
        (768, 128, 384, false, false),
        (128, 768, 384, true, false),
    ];
    let only: Option<usize> = std::env::args().nth(1).map(|x| x.parse().unwrap());
    if let Some(i) = only {
        let (m, k, n, ta, tb) = shapes[i];
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        for _ in 0..300 {
            quill::kernels::matmul::matmul(
                Precision::Bf16,
                &mut c,
                Operand::op(&a, m, k, ta),
                Operand::op(&b, k, n, tb),
                Accumulate::Overwrite,
            );
        }
        return;
    }
    for &(m, k, n, ta, tb) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32) * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * k * n) as f64;
        let mut run = |f: &mut dyn FnMut(&mut [f32])| {
            f(&mut c);
            let mut ts: Vec<f64> = (0..7)
                .map(|_| {
                    let t = Instant::now();
                    f(&mut c);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
            flops / ts[3] / 1e9
        };
        let f32r = run(&mut |c| {
            matmul::matmul(
                Precision::F32,
                c,
                Operand::op(&a, m, k, ta),
                Operand::op(&b, k, n, tb),
                Accumulate::Overwrite,
            )
        });
        let bfr = run(&mut |c| {
            quill::kernels::matmul::matmul(
                Precision::Bf16,
                c,
                Operand::op(&a, m, k, ta),
                Operand::op(&b, k, n, tb),
                Accumulate::Overwrite,
            )
        });
        println!(
            "{m:5}x{k:5}x{n:5} ta={ta:5} tb={tb:5}  gemm f32 {f32r:6.1}  bf16 {bfr:6.1}  x{:.2}",
            bfr / f32r
        );
    }
}
