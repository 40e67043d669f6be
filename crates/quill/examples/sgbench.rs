//! quill's f32 kernel (kernels/sgemm.rs) against the `gemm` crate on the training shapes of
//! char (every product of a step), gpt2-mini, gpt2-small and nano: best GFLOP/s of twenty
//! rounds each, alternating.
//! `cargo run --release -p quill --example sgbench [shape index | m k n [ta tb]]`.
use quill::kernels::product::{Accumulate, Dims, Strided, View, ViewMut};
use quill::kernels::sgemm;
use std::time::Instant;
fn main() {
    if !sgemm::available() {
        eprintln!("this CPU has neither AVX-512 nor AVX2: quill's f32 products run on the gemm crate here");
        return;
    }
    // (m, k, n, A transposed, B transposed): char's forward, dX and dW products, then
    // gpt2-mini's and gpt2-small's largest, then nano's
    let shapes: &[(usize, usize, usize, bool, bool)] = &[
        (2048, 384, 1152, false, false),
        (2048, 1152, 384, false, true),
        (384, 2048, 1152, true, false),
        (2048, 384, 384, false, false),
        (2048, 384, 384, false, true),
        (384, 2048, 384, true, false),
        (2048, 384, 1536, false, false),
        (2048, 1536, 384, false, true),
        (384, 2048, 1536, true, false),
        (2048, 1536, 384, false, false),
        (2048, 384, 1536, false, true),
        (1536, 2048, 384, true, false),
        (2048, 384, 65, false, true),
        (2048, 65, 384, false, false),
        (65, 2048, 384, true, false),
        (2048, 256, 50257, false, true),
        (2048, 50257, 256, false, false),
        (50257, 2048, 256, true, false),
        (1024, 768, 2304, false, false),
        (1024, 3072, 768, false, true),
        (768, 1024, 3072, true, false),
        (768, 128, 384, false, false),
        (128, 768, 384, true, false),
    ];
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|x| x.parse().expect("arguments are numbers"))
        .collect();
    let custom;
    let (shapes, only) = match args[..] {
        // one shape of your own: m k n [A transposed (0/1)] [B transposed (0/1)]
        [m, k, n, ref t @ ..] => {
            custom = [(m, k, n, t.first() == Some(&1), t.get(1) == Some(&1))];
            (&custom[..], None)
        }
        [i] => (shapes, Some(i)),
        [] => (shapes, None),
        _ => {
            eprintln!("usage: sgbench [shape index | m k n [ta tb]]");
            std::process::exit(2);
        }
    };
    for (idx, &(m, k, n, ta, tb)) in shapes.iter().enumerate() {
        if only.is_some_and(|o| o != idx) {
            continue;
        }
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32) * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let (a_rs, a_cs) = if ta { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if tb { (1, k) } else { (n, 1) };
        let fl = 2.0 * (m * k * n) as f64;
        let reps = ((1e9 / fl) as usize).max(1);
        let (mut bs, mut bg) = (0f64, 0f64);
        for _ in 0..20 {
            let t = Instant::now();
            for _ in 0..reps {
                unsafe {
                    let s = Strided::new(
                        Dims::new(m, k, n),
                        ViewMut::new(c.as_mut_ptr(), n),
                        View::new(a.as_ptr(), a_rs, a_cs),
                        View::new(b.as_ptr(), b_rs, b_cs),
                        Accumulate::Overwrite,
                    );
                    sgemm::matmul_fused(Strided {
                        parallel: true,
                        ..s
                    })
                }
            }
            bs = bs.max(reps as f64 * fl / t.elapsed().as_secs_f64() / 1e9);
            let t = Instant::now();
            for _ in 0..reps {
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        a_cs as isize,
                        a_rs as isize,
                        b.as_ptr(),
                        b_cs as isize,
                        b_rs as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(2),
                    )
                }
            }
            bg = bg.max(reps as f64 * fl / t.elapsed().as_secs_f64() / 1e9);
        }
        println!("{idx:2} {m:5}x{k:5}x{n:5} ta={ta:5} tb={tb:5}  sgemm {bs:6.1}  gemm {bg:6.1}");
    }
}
