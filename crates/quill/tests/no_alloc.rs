//! No heap allocation inside a training step (forward, backward, gradient clipping, AdamW) or a
//! decoding step, once the buffers exist: a counting global allocator watches a second step
//! of each. On CPUs with AVX-512 every product runs on quill's own kernels and nothing
//! allocates at all. Elsewhere f32 products go to the `gemm` crate, which allocates small
//! packing buffers inside its calls; those are counted apart (while `GEMM_CALLS_ACTIVE` is
//! non-zero) and reported, not failed.

use quill::kernels::matmul::{Accumulate, Operand, Precision, GEMM_CALLS_ACTIVE};
use quill::model::{Batch, Config, Gpt2Config, LlamaConfig, Model};
use quill::train::optimizer::AdamW;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

struct Counting;
static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static GEMM_ALLOCS: AtomicUsize = AtomicUsize::new(0);

fn note() {
    if COUNTING.load(Ordering::Relaxed) {
        if GEMM_CALLS_ACTIVE.load(Ordering::SeqCst) > 0 {
            GEMM_ALLOCS.fetch_add(1, Ordering::Relaxed);
        } else {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note();
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note();
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Allocations made by `f` (on any thread) outside gemm calls; prints those inside.
fn count(what: &str, f: impl FnOnce()) -> usize {
    ALLOCS.store(0, Ordering::SeqCst);
    GEMM_ALLOCS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    f();
    COUNTING.store(false, Ordering::SeqCst);
    eprintln!(
        "{what}: {} allocations inside the gemm crate",
        GEMM_ALLOCS.load(Ordering::SeqCst)
    );
    ALLOCS.load(Ordering::SeqCst)
}

fn models() -> Vec<Model> {
    let mut g = Model::new(Config::Gpt2(Gpt2Config::new(50, 40, 32, 2, 4))).unwrap();
    g.init(1);
    let mut l = Model::new(Config::Llama(LlamaConfig::new(50, 40, 32, 2, 4, 2))).unwrap();
    l.init(1);
    vec![g, l]
}

#[test]
fn steps_do_not_allocate() {
    // as the command line does: the work starts inside the pool (a call from outside queues
    // it through rayon's injector, which allocates)
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    // every pool thread sizes its packing buffers (with a model this small, a thread may
    // sit out whole steps, and would size them inside a counted one)
    pool.broadcast(|_| {
        let (a, b, mut c) = (vec![1.0f32; 64], vec![1.0f32; 64], vec![0.0f32; 64]);
        quill::kernels::matmul::matmul(
            Precision::Bf16,
            &mut c,
            Operand::new(&a, 8, 8),
            Operand::new(&b, 8, 8),
            Accumulate::Overwrite,
        );
        // f32: B's packing buffer, and the copy of a transposed A's rows
        quill::kernels::matmul::matmul(
            Precision::F32,
            &mut c,
            Operand::new(&a, 8, 8).t(),
            Operand::new(&b, 8, 8),
            Accumulate::Overwrite,
        );
    });
    pool.install(check_models);
}

fn check_models() {
    for mut model in models() {
        let (b, t) = (3, 37);
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 50) as u32).collect();
        let targets: Vec<u32> = (0..b * t).map(|i| (i * 3 % 50) as u32).collect();
        let mut acts = model.new_acts(b, t);
        let mut grads = vec![0.0; model.num_params()];
        let mut opt = AdamW::new(model.num_params(), 0.9, 0.95, 1e-8, 0.1);
        let mut step = |model: &mut Model| {
            grads.fill(0.0);
            model.forward(&mut acts, &ids).unwrap();
            model.backward(&mut acts, &mut grads, Batch::new(&ids, &targets, 1.0));
            let (layout, params) = model.params_mut();
            // as the trainer does: the gradient norm, clipping and AdamW in one
            opt.step_clipped(layout, params, &grads, 1e-3, 0.5);
        };
        step(&mut model);
        let arch = model.architecture();
        let n = count(&format!("{arch} training step"), || step(&mut model));
        assert_eq!(n, 0, "{arch}: a training step allocated {n} times");
        if quill::kernels::sgemm::available() {
            assert_eq!(
                GEMM_ALLOCS.load(Ordering::SeqCst),
                0,
                "{arch}: an f32 training step allocated inside the gemm crate"
            );
        }
        // bf16 mixed precision runs every product on quill's own kernels: the packed bf16
        // one where the CPU has bf16 products (or none of AVX2), else the f32 one on
        // operands rounded to bf16. Nothing allocates, not even inside gemm (the packing
        // buffers are per thread, sized at first use); only a CPU without AVX2 takes the
        // gemm crate's path for f32.
        let own_kernel = quill::kernels::bf16::has_bf16()
            || quill::kernels::sgemm::available()
            || !quill::kernels::simd::has_avx2();
        model.set_precision(Precision::Bf16);
        for _ in 0..3 {
            step(&mut model);
        }
        let n = count(&format!("{arch} bf16 training step"), || step(&mut model));
        assert_eq!(n, 0, "{arch}: a bf16 training step allocated {n} times");
        if own_kernel {
            assert_eq!(
                GEMM_ALLOCS.load(Ordering::SeqCst),
                0,
                "{arch}: bf16 step called gemm"
            );
        }
        model.set_precision(Precision::F32);

        let mut cache = model.new_cache(40);
        let mut logits = Vec::new();
        model
            .forward_cached(&mut cache, &ids[..5], &mut logits, false)
            .unwrap();
        model
            .forward_cached(&mut cache, &[1], &mut logits, false)
            .unwrap();
        let n = count(&format!("{arch} decoding"), || {
            for i in 0..10 {
                model
                    .forward_cached(&mut cache, &[i], &mut logits, false)
                    .unwrap();
            }
        });
        assert_eq!(n, 0, "{arch}: decoding allocated {n} times");
    }
}
