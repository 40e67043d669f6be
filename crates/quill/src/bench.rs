//! `quill bench`: this machine's matrix-multiply and memory-bandwidth peaks, and the speed of
//! whole training steps (forward, backward, AdamW) for standard configurations. Figures, not
//! tests: compare them with a peer measured in the same session (BENCHMARKS.md).

pub use crate::kernels::families::{cpu_name, kernels, Kernels};
use crate::kernels::matmul::{matmul, Accumulate, Operand, Precision};
use crate::model::{Batch, Config, Gpt2Config, Model};
use crate::rng::Rng;
use crate::train::dist::{Comm, DataParallel};
use crate::train::optimizer::AdamW;
use crate::{Error, Result};
use serde::Serialize;
use std::rc::Rc;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct Peak {
    /// The CPU's model name (/proc/cpuinfo).
    pub cpu: String,
    /// Every kernel family and whether this run uses it.
    pub kernels: Kernels,
    pub threads: usize,
    /// Best fp32 GEMM rate over the sizes tried, GFLOP/s (2·n³ per product).
    pub fp32_gflops: f64,
    /// Per size: (n, GFLOP/s).
    pub fp32_by_size: Vec<(usize, f64)>,
    /// Copy bandwidth of a 1 GiB buffer, bytes read + written, GB/s.
    pub copy_gbs: f64,
    /// Read bandwidth of a 1 GiB buffer (summed over the threads), GB/s: what decoding, which
    /// reads its weights and writes almost nothing, can approach.
    pub read_gbs: f64,
    /// bf16 products with f32 accumulation (quill's `vdpbf16ps` kernel), best over the sizes
    /// tried, GFLOP/s; None where the CPU has no AVX-512 BF16.
    pub bf16_gflops: Option<f64>,
    /// Integer block dot products (GGUF Q8_0 weights against activations quantized to 16
    /// bits, AVX-512 VNNI or AVX2) on a batch of 16 rows, billions of multiply-adds × 2 a
    /// second.
    pub int8_gops: f64,
}

/// Multiply-adds × 2 a second of quantized products (Q8_0 weights, 2048 × 2048, in cache
/// tiers the weights fit; a batch of 16 rows).
fn int8_rate() -> f64 {
    use crate::kernels::linear::{quant_linear, QPart};
    use crate::kernels::quant::{quantize::quantize, QType};
    let (rows, cols, n) = (2048usize, 2048usize, 16usize);
    let mut rng = Rng::new(3);
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| rng.uniform() as f32 - 0.5)
        .collect();
    let mut bytes = Vec::new();
    quantize(QType::Q8_0, &w, &mut bytes);
    let x: Vec<f32> = (0..n * cols).map(|_| rng.uniform() as f32 - 0.5).collect();
    let mut y = vec![0.0f32; n * rows];
    let part = [QPart::rows(&bytes, QType::Q8_0)];
    quant_linear(&mut y, rows, &x, cols, &part);
    let times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            quant_linear(&mut y, rows, &x, cols, &part);
            t.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * (rows * cols * n) as f64 / median(times) / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn peak() -> Peak {
    let mut by_size = Vec::new();
    for n in [512usize, 1024, 2048] {
        let a = vec![1.0f32; n * n];
        let b = vec![0.5f32; n * n];
        let mut c = vec![0.0f32; n * n];
        let ab = (Operand::new(&a, n, n), Operand::new(&b, n, n));
        matmul(Precision::F32, &mut c, ab.0, ab.1, Accumulate::Overwrite);
        let reps = if n <= 1024 { 8 } else { 3 };
        let times: Vec<f64> = (0..reps)
            .map(|_| {
                let t = Instant::now();
                matmul(Precision::F32, &mut c, ab.0, ab.1, Accumulate::Overwrite);
                t.elapsed().as_secs_f64()
            })
            .collect();
        by_size.push((n, 2.0 * (n * n * n) as f64 / median(times) / 1e9));
    }
    let bw = bandwidth();
    let bf16_gflops = crate::kernels::bf16::has_bf16().then(|| {
        let mut best = 0.0f64;
        for n in [512usize, 1024, 2048] {
            let a = vec![1.0f32; n * n];
            let b = vec![0.5f32; n * n];
            let mut c = vec![0.0f32; n * n];
            let ab = (Operand::new(&a, n, n), Operand::new(&b, n, n));
            matmul(Precision::Bf16, &mut c, ab.0, ab.1, Accumulate::Overwrite);
            let times: Vec<f64> = (0..3)
                .map(|_| {
                    let t = Instant::now();
                    matmul(Precision::Bf16, &mut c, ab.0, ab.1, Accumulate::Overwrite);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            best = best.max(2.0 * (n * n * n) as f64 / median(times) / 1e9);
        }
        best
    });
    Peak {
        cpu: cpu_name(),
        kernels: kernels(),
        int8_gops: int8_rate(),
        bf16_gflops,
        threads: rayon::current_num_threads(),
        fp32_gflops: by_size.iter().map(|x| x.1).fold(0.0, f64::max),
        fp32_by_size: by_size,
        copy_gbs: bw.copy_gbs,
        read_gbs: bw.read_gbs,
    }
}

/// Memory bandwidth over a 1 GiB buffer, GB/s, each the median of three passes after a
/// first one that faults the pages in.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Bandwidth {
    /// A parallel copy into a second buffer: bytes read + written.
    pub copy_gbs: f64,
    /// A parallel sum: bytes read.
    pub read_gbs: f64,
}

impl Bandwidth {
    /// The higher of two measurements, field by field: the memory's ceiling when its speed
    /// moves between runs (a VM sharing its host), against which a share is not flattered.
    pub fn max(self, other: Bandwidth) -> Bandwidth {
        Bandwidth {
            copy_gbs: self.copy_gbs.max(other.copy_gbs),
            read_gbs: self.read_gbs.max(other.read_gbs),
        }
    }
}

pub fn bandwidth() -> Bandwidth {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 20;
    let len = (1usize << 30) / 4;
    let src = vec![1.0f32; len];
    let timed = |f: &mut dyn FnMut()| {
        f();
        let times: Vec<f64> = (0..3)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect();
        median(times)
    };
    let read = timed(&mut || {
        read_pass(&src);
    });
    let mut dst = vec![0.0f32; len];
    let copy = timed(&mut || {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s))
    });
    let bytes = (len * 4) as f64;
    Bandwidth {
        copy_gbs: 2.0 * bytes / copy / 1e9,
        read_gbs: bytes / read / 1e9,
    }
}

/// One parallel read of every float of `src` (a sum the compiler may not drop).
fn read_pass(src: &[f32]) {
    use rayon::prelude::*;
    let s: f32 = src.par_chunks(1 << 20).map(sum_lanes).sum();
    std::hint::black_box(s);
}

/// A read probe short enough to run between rounds of decoding (a 256 MB buffer, eight
/// times this machine's largest cache, read twice), so that each round's bandwidth is set
/// beside the memory's speed at that moment: on a VM sharing its host that speed moves
/// between levels from one minute to the next (AMD EPYC Zen 5: about 28, 45 and 70 GB/s),
/// and a probe seconds away from the decoding may have caught another level.
struct ReadProbe {
    buf: Vec<f32>,
}

impl ReadProbe {
    fn new() -> ReadProbe {
        let buf = vec![1.0f32; (256 << 20) / 4];
        read_pass(&buf);
        ReadProbe { buf }
    }

    /// GB/s of the faster of two passes (the higher bandwidth: the share is not flattered).
    fn read_gbs(&self) -> f64 {
        let best = (0..2)
            .map(|_| {
                let t = Instant::now();
                read_pass(&self.buf);
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min);
        (self.buf.len() * 4) as f64 / best / 1e9
    }
}

crate::kernels::simd::multiversion! {
    /// A sum in 64 independent lanes (vectorized, in the widest registers the CPU has, and
    /// enough chains to hide the adds' latency), so that reading memory is the only limit.
    /// Compiled for the baseline x86-64 alone (16-byte loads), it read 46 GB/s where the
    /// matrix-vector kernel read 50-61 (AMD EPYC Zen 5).
    fn sum_lanes(x: &[f32]) -> f32 {
        let mut acc = [0.0f32; 64];
        let chunks = x.chunks_exact(64);
        let rest: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for i in 0..64 {
                acc[i] += c[i];
            }
        }
        acc.iter().sum::<f32>() + rest
    }
}

/// A standard training configuration (the PyTorch peer scripts use the same ones).
pub struct TrainBenchConfig {
    pub name: &'static str,
    pub vocab: usize,
    pub layers: usize,
    pub heads: usize,
    pub width: usize,
    pub seq: usize,
    pub batch: usize,
}

pub fn train_config(name: &str) -> Result<TrainBenchConfig> {
    let c = |name, vocab, layers, heads, width, seq, batch| TrainBenchConfig {
        name,
        vocab,
        layers,
        heads,
        width,
        seq,
        batch,
    };
    Ok(match name {
        "nano" => c("nano", 65, 4, 4, 128, 64, 12),
        "char" => c("char", 65, 6, 6, 384, 256, 8),
        "gpt2-mini" => c("gpt2-mini", 50257, 4, 4, 256, 256, 8),
        "gpt2-small" => c("gpt2-small", 50257, 12, 12, 768, 1024, 1),
        other => {
            return Err(Error::Input(format!(
                "unknown config {other:?} (nano, char, gpt2-mini, gpt2-small)"
            )))
        }
    })
}

#[derive(Debug, Serialize)]
pub struct TrainBench {
    /// The machine and the kernel families the run took.
    pub cpu: String,
    pub kernels: Kernels,
    pub config: String,
    /// Operand precision of the products: f32 or bf16.
    pub dtype: &'static str,
    /// Threads of each rank.
    pub threads: usize,
    /// Processes of a data-parallel run (1: one process).
    pub ranks: usize,
    /// AdamW's moments sharded over the ranks (ZeRO-1).
    pub zero: bool,
    pub batch: usize,
    pub seq: usize,
    pub params: usize,
    /// Parameters outside the position embedding (the MFU formula's N).
    pub n_for_flops: usize,
    pub flops_per_token: f64,
    pub tokens_per_sec: f64,
    pub best_tokens_per_sec: f64,
    /// Model FLOPs utilisation against `peak_gflops` (when given).
    pub mfu: Option<f64>,
    /// Peak resident memory of the run, bytes (Linux; from the start of the model's setup).
    pub peak_rss: Option<u64>,
    /// What the run holds by design (`memory`) plus the resident memory before the model
    /// was made.
    pub accounted_bytes: u64,
    /// What one rank holds by design.
    pub memory: RankMemory,
}

/// Peak resident set size of this process so far (VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Current resident set size (VmRSS), in bytes.
pub fn current_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak RSS counter to the current RSS (Linux: `5` into /proc/self/clear_refs).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// How a training benchmark runs.
pub struct TrainBenchOptions {
    /// Sequences per step (the global batch, split over the ranks).
    pub batch: usize,
    pub seq: usize,
    /// Timed steps (after 2 warm-up steps).
    pub steps: usize,
    pub precision: Precision,
    /// The peak MFU is measured against (GFLOP/s of one process).
    pub peak_gflops: Option<f64>,
    /// The ranks of a data-parallel run (one process: [`Single`]).
    pub comm: Rc<dyn Comm>,
    /// ZeRO-1: AdamW's moments sharded over the ranks.
    pub zero: bool,
}

/// Median tokens/s (of the whole global batch) of training steps after 2 warm-up steps: the
/// forward and backward passes over this rank's rows, the gradients' exchange and AdamW.
pub fn train(cfg: &TrainBenchConfig, o: &TrainBenchOptions) -> Result<TrainBench> {
    let (batch, seq) = (o.batch, o.seq);
    reset_peak_rss();
    let baseline = current_rss().unwrap_or(0);
    let mc = Gpt2Config::new(cfg.vocab, seq, cfg.width, cfg.layers, cfg.heads);
    let mut model = Model::new(Config::Gpt2(mc))?;
    model.init(0);
    model.precision = o.precision;
    let ranks = o.comm.size();
    crate::train::dist::check_split(batch, model.num_params(), ranks)?;
    let mut dp = DataParallel::new(o.comm.clone(), model.num_params(), o.zero);
    let rows = crate::train::dist::rows(batch, dp.rank(), ranks);
    let mut acts = model.new_acts(rows.len(), seq);
    let mut grads = vec![0.0f32; dp.grad_len()];
    let own = dp.moment_range().len();
    let mut opt = AdamW::new(own, 0.9, 0.95, 1e-8, 0.1);
    let mut rng = Rng::new(0);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.below(cfg.vocab) as u32)
        .collect();
    let targets: Vec<u32> = (0..batch * seq)
        .map(|_| rng.below(cfg.vocab) as u32)
        .collect();
    let mine = rows.start * seq..rows.end * seq;
    let (ids, targets) = (&ids[mine.clone()], &targets[mine]);
    let mut times = Vec::new();
    for step in 0..o.steps + 2 {
        dp.comm.barrier();
        let t = Instant::now();
        grads.fill(0.0);
        model.forward(&mut acts, ids)?;
        let b = Batch::new(ids, targets, 1.0).over(batch * seq);
        let n = model.num_params();
        model.backward(&mut acts, &mut grads[..n], b);
        let (layout, params) = model.params_mut();
        dp.step(&mut opt, layout, params, &mut grads, (3e-4, 1.0));
        // every rank's step has ended: rank 0's clock then times the slowest
        dp.comm.barrier();
        if step >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let tokens = (batch * seq) as f64;
    let n = model.num_params() - seq * cfg.width; // the position table is a lookup
    let flops_per_token = 6.0 * n as f64 + 12.0 * (cfg.layers * cfg.width * seq) as f64;
    let best = times.iter().cloned().fold(f64::MAX, f64::min);
    let tps = tokens / median(times);
    let p = model.num_params() as u64;
    let memory = RankMemory {
        params: 4 * p,
        grads: 4 * grads.len() as u64,
        moments: 8 * own as u64,
        exchange: 4 * dp.shards.len as u64 * (ranks > 1) as u64,
        activations: 4 * acts.floats() as u64,
    };
    Ok(TrainBench {
        cpu: cpu_name(),
        kernels: kernels(),
        config: cfg.name.to_string(),
        dtype: o.precision.name(),
        threads: rayon::current_num_threads(),
        ranks,
        zero: dp.zero,
        batch,
        seq,
        params: model.num_params(),
        n_for_flops: n,
        flops_per_token,
        tokens_per_sec: tps,
        best_tokens_per_sec: tokens / best,
        // against the peak of all the ranks' cores together
        mfu: o
            .peak_gflops
            .map(|p| flops_per_token * tps / (p * ranks as f64 * 1e9)),
        peak_rss: peak_rss(),
        accounted_bytes: baseline + memory.total(),
        memory,
    })
}

/// What one rank of a training benchmark holds by design, bytes.
#[derive(Debug, Serialize)]
pub struct RankMemory {
    pub params: u64,
    /// Gradients (padded to whole shards with several ranks).
    pub grads: u64,
    /// AdamW's two moments: of every parameter, or of this rank's shard with ZeRO-1.
    pub moments: u64,
    /// The shard a reduce-scatter receives (several ranks).
    pub exchange: u64,
    /// Every activation and backward buffer of this rank's rows.
    pub activations: u64,
}

impl RankMemory {
    pub fn total(&self) -> u64 {
        self.params + self.grads + self.moments + self.exchange + self.activations
    }
}

#[derive(Debug, Serialize)]
pub struct GenerateBench {
    /// The machine and the kernel families the run took (results from different CPUs are
    /// never mixed up).
    pub cpu: String,
    pub kernels: Kernels,
    pub model: String,
    pub architecture: String,
    pub threads: usize,
    pub params: usize,
    pub prompt_len: usize,
    pub new_tokens: usize,
    /// Prompt processing: prompt tokens / time of one forward over the prompt (best of 3).
    pub prompt_tokens_per_sec: f64,
    /// Decoding at batch 1: new tokens / total time, greedy, the context growing from the prompt.
    pub decode_tokens_per_sec: f64,
    /// Weight bytes read per decoded token, in their stored precision.
    pub weight_bytes_per_token: usize,
    /// weight bytes per token × decode tokens/s, GB/s.
    pub decode_gbs: f64,
    /// The memory bandwidth measured (`quill bench generate`: the higher of a measurement
    /// before the model is opened and one after decoding).
    pub bandwidth: Option<Bandwidth>,
    /// decode_gbs ÷ the measured read bandwidth (when measured).
    pub bandwidth_util: Option<f64>,
    /// Decoding's share of the read bandwidth measured beside it: the decoding runs in
    /// rounds, each followed by a short read probe.
    pub paired: Paired,
    /// Peak resident memory of the model's setup, prompt and first decoded token, bytes
    /// (Linux; before the paired probe's buffer is made).
    pub peak_rss: Option<u64>,
}

/// Decoding against the bandwidth measured just after each of its rounds.
#[derive(Debug, Serialize)]
pub struct Paired {
    pub rounds: usize,
    /// Per round: its decoding's GB/s ÷ the probe's.
    pub shares: Vec<f64>,
    /// The median of `shares` (of an even count, the lower middle one).
    pub share: f64,
    /// The median of the rounds' probes, GB/s (of an even count, the higher middle one).
    pub read_gbs: f64,
}

impl GenerateBench {
    /// Records the memory's read bandwidth and decoding's share of it.
    pub fn against(&mut self, bw: Bandwidth) {
        self.bandwidth = Some(bw);
        self.bandwidth_util = Some(self.decode_gbs / bw.read_gbs);
    }
}

/// Prompt and decode speed of `model` on random token ids (seeded); the bandwidth fields are
/// left for the caller's measurement ([`GenerateBench::against`]).
pub fn generate(model: &Model, name: &str, prompt_len: usize, new: usize) -> Result<GenerateBench> {
    if prompt_len == 0 || new == 0 {
        return Err(Error::Input(
            "--prompt-len and --new must be at least 1".into(),
        ));
    }
    if prompt_len + new > model.context() {
        return Err(Error::Input(format!(
            "prompt {prompt_len} + new {new} tokens exceed the model's context of {}",
            model.context()
        )));
    }
    let mut rng = Rng::new(0);
    let v = model.vocab_size();
    let prompt: Vec<u32> = (0..prompt_len).map(|_| rng.below(v) as u32).collect();
    let mut logits = Vec::new();
    let mut best = f64::MAX;
    let mut cache = model.new_cache(prompt_len + new);
    for _ in 0..3 {
        cache.clear();
        let t = Instant::now();
        model.forward_cached(&mut cache, &prompt, &mut logits, false)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    // decoding in rounds, each timed alone and followed by a read probe (made after the
    // first round, once the peak memory of the model's own work is known)
    let bytes = model.weight_bytes_per_token();
    let rounds = new.min(7);
    let (mut total, mut probe, mut peak) = (0.0, None, None);
    let (mut shares, mut reads) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let tokens = (r + 1) * new / rounds - r * new / rounds;
        let t = Instant::now();
        for _ in 0..tokens {
            let next = crate::sample::argmax(&logits);
            model.forward_cached(&mut cache, &[next], &mut logits, false)?;
        }
        let secs = t.elapsed().as_secs_f64();
        total += secs;
        if r == 0 {
            peak = peak_rss();
        }
        let read = probe.get_or_insert_with(ReadProbe::new).read_gbs();
        shares.push((bytes * tokens) as f64 / secs / 1e9 / read);
        reads.push(read);
    }
    let decode = new as f64 / total;
    let gbs = bytes as f64 * decode / 1e9;
    Ok(GenerateBench {
        cpu: cpu_name(),
        kernels: kernels(),
        model: name.to_string(),
        architecture: model.architecture().to_string(),
        threads: rayon::current_num_threads(),
        params: model.num_params(),
        prompt_len,
        new_tokens: new,
        prompt_tokens_per_sec: prompt_len as f64 / best,
        decode_tokens_per_sec: decode,
        weight_bytes_per_token: bytes,
        decode_gbs: gbs,
        bandwidth: None,
        bandwidth_util: None,
        paired: Paired {
            rounds,
            // the lower middle when the count is even (fewer than seven tokens): not flattered
            share: {
                let mut v = shares.clone();
                v.sort_by(f64::total_cmp);
                v[(v.len() - 1) / 2]
            },
            shares,
            read_gbs: median(reads),
        },
        peak_rss: peak,
    })
}
