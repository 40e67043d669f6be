//! Decoding's matrix-vector products alone, over many matrices (more than the caches hold),
//! in f32, bf16 and f16: GB/s of weights read.
//! `cargo run --release -p quill --example mvbench -- [INPUTS ROWS MATRICES]` (default: GPT-2
//! 124M's block shape, 768 inputs, 6912 rows (q|k|v, o, up, down as rows), 12 matrices).
use quill::kernels::linear::{matvec, MatRef};
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let (inp, rows, mats) = (
        *a.first().unwrap_or(&768),
        *a.get(1).unwrap_or(&6912),
        *a.get(2).unwrap_or(&12),
    );
    let x: Vec<f32> = (0..inp).map(|i| (i as f32 * 0.37).sin()).collect();
    let n = inp * rows;
    let f: Vec<Vec<f32>> = (0..mats)
        .map(|m| (0..n).map(|i| ((i + m) as f32 * 0.11).cos()).collect())
        .collect();
    let b: Vec<Vec<u16>> = f
        .iter()
        .map(|w| {
            w.iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect()
        })
        .collect();
    let h: Vec<Vec<u16>> = f
        .iter()
        .map(|w| {
            w.iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect()
        })
        .collect();
    let mut y = vec![0.0f32; rows];
    for round in 0..3 {
        for (name, bytes) in [("f32", 4), ("bf16", 2), ("f16", 2)] {
            let t = Instant::now();
            let reps = 20;
            for _ in 0..reps {
                for m in 0..mats {
                    let w = match name {
                        "f32" => MatRef::F32(&f[m]),
                        "bf16" => MatRef::Bf16(&b[m]),
                        _ => MatRef::F16(&h[m]),
                    };
                    matvec(&mut y, &x, w, inp);
                }
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            let gb = (n * mats * bytes) as f64 / s / 1e9;
            println!("round {round} {name:<5} {:8.3} ms  {gb:6.1} GB/s", s * 1e3);
        }
    }
}
