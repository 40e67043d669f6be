//! `quill train`: flags, corpus loading, progress bar, final samples.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use quill::data::prepare::{
    char_vocabulary, collect_sources, load as load_prepared, prepare, Options as PrepareOptions,
    Source,
};
use quill::kernels::matmul::Precision;
use quill::model::{Config, Gpt2Config, LlamaConfig, Model};
use quill::tokenizer::{train_byte_level_bpe, Tokenizer};
use quill::train::dist::Comm;
use quill::train::trainer::Data;
use quill::train::trainer::TokenizerInfo;
use quill::train::{Event, RunOptions, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Tiny Shakespeare (public domain text; see data/LICENSES.md), the default corpus.
const TINY_SHAKESPEARE: &str = include_str!("../../../data/tinyshakespeare.txt");
const EMBEDDED: &str = "embedded:tinyshakespeare";

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Text file to train on (UTF-8). Default: Tiny Shakespeare, embedded in the binary.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Output folder: a Hugging Face model folder plus training state, metrics.jsonl and loss.svg.
    #[arg(long, default_value = "out")]
    out: PathBuf,
    /// Continue the run saved in --out, exactly where it stopped.
    #[arg(long)]
    resume: bool,
    /// Replace a run already saved in --out instead of refusing.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Start from the weights and tokenizer of an existing model folder (fine-tuning).
    #[arg(long, conflicts_with = "resume")]
    init: Option<PathBuf>,
    /// Tokenizer of a new model: `char` (characters of the corpus), `gpt2` (OpenAI's GPT-2
    /// BPE, built in), `bpe:N` (a byte-level BPE of N tokens trained on the corpus), or a
    /// tokenizer.json path [default: char].
    #[arg(long)]
    tokenizer: Option<String>,
    /// Architecture of a new model: `gpt2` (learned positions, LayerNorm, GELU) or `llama`
    /// (rotary positions, RMSNorm, SwiGLU, grouped-query attention) [default: gpt2].
    #[arg(long)]
    arch: Option<String>,
    /// Key/value heads of a new llama model (grouped-query attention; must divide --heads)
    /// [default: --heads].
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Transformer blocks [default: 4].
    #[arg(long)]
    layers: Option<usize>,
    /// Attention heads per block [default: 2].
    #[arg(long)]
    heads: Option<usize>,
    /// Embedding width (n_embd) [default: 96].
    #[arg(long)]
    width: Option<usize>,
    /// Context length in tokens [default: 128; with --init, the model's].
    #[arg(long)]
    context: Option<usize>,
    /// Optimizer steps [default: 5000].
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per micro-batch [default: 16].
    #[arg(long)]
    batch: Option<usize>,
    /// Micro-batches per optimizer step (gradient accumulation) [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Peak learning rate [default: 5e-3; 3e-4 with --init].
    #[arg(long)]
    lr: Option<f32>,
    /// Final learning rate of the cosine decay [default: lr / 50].
    #[arg(long)]
    min_lr: Option<f32>,
    /// Linear warm-up steps [default: 200].
    #[arg(long)]
    warmup: Option<usize>,
    /// AdamW weight decay, on matrices only [default: 0.1].
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Clip the gradient's global norm to this (0: no clipping) [default: 1.0].
    #[arg(long)]
    grad_clip: Option<f32>,
    /// Evaluate on the whole validation split, print a sample and save every N steps [default: 1000].
    #[arg(long)]
    eval_interval: Option<usize>,
    /// Fraction of the corpus (its end) held out for validation [default: 0.1].
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Random seed for initialisation and batch sampling [default: 1337].
    #[arg(long)]
    seed: Option<u64>,
    /// Characters of sample text printed at each evaluation [default: 200].
    #[arg(long)]
    sample_tokens: Option<usize>,
    /// Stop (saving a checkpoint) after this many seconds; resume later with --resume.
    #[arg(long)]
    time_limit: Option<f64>,
    /// Stop (saving a checkpoint) after this many steps of this invocation; the schedule still
    /// plans for --steps, so --resume continues exactly.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Replace invalid UTF-8 in the corpus with U+FFFD instead of stopping at it.
    #[arg(long)]
    lossy: bool,
    /// No progress bar (log lines only).
    #[arg(long)]
    quiet: bool,
    /// Matrix-product operands: f32, or bf16 (mixed precision: bf16 operands with f32
    /// accumulation; master weights, gradients, optimizer and every other kernel stay f32)
    /// [default: f32, or the resumed run's].
    #[arg(long)]
    dtype: Option<String>,
    #[command(flatten)]
    pub(crate) ranks: RankArgs,
}

/// Flags of a data-parallel run (`mpirun -np N quill train ...`, with the `mpi` feature).
#[derive(clap::Args, Debug, Default)]
pub(crate) struct RankArgs {
    /// With several MPI ranks: keep AdamW's moments whole on every rank instead of sharding
    /// them over the ranks (ZeRO-1, the default, holds 1/N of them on each).
    #[arg(long)]
    pub no_zero: bool,
    /// With several MPI ranks: check after every step that all ranks hold bit-identical
    /// parameters (a hash of them is gathered); stop with an error if not.
    #[arg(long)]
    pub verify_ranks: bool,
    /// Write each step's training loss (the whole global batch's mean) to this file, one
    /// JSON line per step of this invocation.
    #[arg(long)]
    pub loss_log: Option<PathBuf>,
}

impl RankArgs {
    /// Makes `trainer` one rank of the run over `comm` (a one-process run stays as it is).
    pub(crate) fn distribute<'a>(
        &self,
        trainer: Trainer<'a>,
        comm: Rc<dyn Comm>,
    ) -> Result<Trainer<'a>> {
        let mut trainer = trainer.distribute(comm, !self.no_zero)?;
        trainer.verify_ranks = self.verify_ranks;
        Ok(trainer)
    }
}

/// Runs `body` as one rank of the run in `comm`: with several ranks, an error on any rank
/// is printed with its rank and ends every rank of the job (the others would wait for it in
/// their next exchange forever).
pub(crate) fn on_ranks<T>(
    comm: Rc<dyn Comm>,
    body: impl FnOnce(Rc<dyn Comm>) -> Result<T>,
) -> Result<T> {
    match body(comm.clone()) {
        Err(e) if comm.size() > 1 => {
            eprintln!("error: rank {} of {}: {e:#}", comm.rank(), comm.size());
            comm.abort(1)
        }
        r => r,
    }
}

pub(crate) fn parse_dtype(s: &str) -> Result<Precision> {
    let p = Precision::parse(s)
        .ok_or_else(|| anyhow::anyhow!("--dtype {s:?}: expected f32 or bf16"))?;
    if p == Precision::Bf16 && !quill::kernels::bf16::has_bf16() {
        if quill::kernels::matmul::bf16_is_rounded_f32() {
            eprintln!(
                "note: this CPU has no AVX-512 BF16 (or QUILL_SIMD caps the kernels below avx512): bf16 products run as f32 products of operands rounded to bf16, a little slower than --dtype f32 here"
            );
        } else {
            eprintln!(
                "warning: this CPU has no AVX-512 BF16 or AVX2 (or QUILL_SIMD caps the kernels): bf16 products run on a plain, much slower path; --dtype f32 is faster here"
            );
        }
    }
    Ok(p)
}

/// Where the data came from, so --resume can find the same tokens again.
#[derive(Serialize, Deserialize)]
struct RunInfo {
    data: String,
    data_dir: PathBuf,
    /// Precision of the products (f32 or bf16); absent in runs from before it existed.
    #[serde(default)]
    dtype: Option<String>,
}

/// Removes temporary files that a killed write left behind (`.NAME.tmp-PID`).
fn remove_stale_temporaries(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

pub(crate) fn check_writable(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))?;
    remove_stale_temporaries(dir);
    let probe = dir.join(".quill-write-probe");
    std::fs::write(&probe, b"ok")
        .with_context(|| format!("cannot write to output folder {}", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Refuses a model whose weights, gradients and AdamW moments (16 bytes a parameter) would
/// not fit in this machine's memory, before they are allocated (and the system kills the
/// process halfway).
pub(crate) fn check_training_memory(params: usize) -> Result<()> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    });
    let need = params as u64 * 16;
    if let Some(total) = total {
        if need > total {
            bail!(
                "training a model of {params} parameters needs about {:.1} GB (weights, gradients and AdamW moments in f32); this machine has {:.1} GB",
                need as f64 / 1e9,
                total as f64 / 1e9
            );
        }
    }
    Ok(())
}

/// Learning rates, weight decay and clipping flags: finite and ≥ 0, checked before any work.
pub(crate) fn check_rates(flags: &[(&str, Option<f32>)]) -> Result<()> {
    for &(flag, v) in flags {
        if let Some(v) = v {
            if !v.is_finite() || v < 0.0 {
                bail!("{flag} must be a finite number ≥ 0 (got {v})");
            }
        }
    }
    Ok(())
}

pub fn run(a: TrainArgs) -> Result<()> {
    let comm = quill::train::dist::from_env()?;
    on_ranks(comm, |comm| run_rank(a, comm))
}

/// `quill train` on one rank. Rank 0 makes a new run's folder (data, tokenizer, initial
/// checkpoint) as a single process would; the other ranks wait for it, then open that
/// checkpoint as a resumed run does, so every rank starts from the same files.
fn run_rank(a: TrainArgs, comm: Rc<dyn Comm>) -> Result<()> {
    if a.resume || comm.rank() != 0 {
        if !a.resume {
            comm.barrier();
        }
        let out = a.out.clone();
        return resume(a, &out, comm);
    }
    // numbers checked before any work is done for them
    check_rates(&[
        ("--lr", a.lr),
        ("--min-lr", a.min_lr),
        ("--weight-decay", a.weight_decay),
        ("--grad-clip", a.grad_clip),
    ])?;
    use quill::train::trainer::{MAX_BATCH_TOKENS, MAX_CONTEXT};
    let (batch, context) = (a.batch.unwrap_or(16), a.context.unwrap_or(128));
    if context > MAX_CONTEXT
        || batch
            .checked_mul(context)
            .is_none_or(|t| t > MAX_BATCH_TOKENS)
    {
        bail!(
            "a batch of {batch} sequences of {context} tokens is beyond quill's limits (context ≤ {MAX_CONTEXT}, batch × context ≤ {MAX_BATCH_TOKENS})"
        );
    }
    let out = a.out.clone();
    if out
        .join(quill::train::checkpoint::TRAINING_STATE_FILE)
        .exists()
        && !a.overwrite
    {
        bail!(
            "{} already holds a training run: pass --resume to continue it, --overwrite to replace it, or another --out",
            out.display()
        );
    }
    let precision = parse_dtype(a.dtype.as_deref().unwrap_or("f32"))?;
    let val_fraction = a.val_fraction.unwrap_or(0.1);
    // Where the tokens come from: a folder made by `quill prepare`, or text (a file, or the
    // embedded corpus) that is prepared into OUT/data first.
    let prepared_dir = a.data.as_ref().filter(|p| p.is_dir()).cloned();
    let sources = match (&prepared_dir, &a.data) {
        (Some(_), _) => vec![],
        (None, Some(p)) => collect_sources(std::slice::from_ref(p))?,
        (None, None) => vec![Source::Text {
            name: EMBEDDED.into(),
            text: TINY_SHAKESPEARE.into(),
        }],
    };
    check_writable(&out)?;

    let (mut model, tok) = match &a.init {
        Some(dir) => {
            let model = quill::io::hf::load(dir, false)?;
            let tok = Tokenizer::load(dir)
                .with_context(|| format!("--init {}: its tokenizer", dir.display()))?;
            for flag in [
                ("--layers", a.layers),
                ("--heads", a.heads),
                ("--kv-heads", a.kv_heads),
                ("--width", a.width),
            ] {
                if flag.1.is_some() {
                    eprintln!(
                        "warning: {} is ignored with --init (the model's shape is kept)",
                        flag.0
                    );
                }
            }
            if a.tokenizer.is_some() || a.arch.is_some() {
                eprintln!(
                    "warning: --tokenizer and --arch are ignored with --init (the model's are kept)"
                );
            }
            (model, tok)
        }
        None => {
            let tok = match &prepared_dir {
                Some(dir) => Tokenizer::load(dir)
                    .with_context(|| format!("prepared data {}", dir.display()))?,
                None => new_tokenizer(a.tokenizer.as_deref().unwrap_or("char"), &sources, a.lossy)?,
            };
            let (ctx, width) = (a.context.unwrap_or(128), a.width.unwrap_or(96));
            let (layers, heads) = (a.layers.unwrap_or(4), a.heads.unwrap_or(2));
            // stated limits, so that the shape's arithmetic cannot overflow
            for (flag, v, max) in [
                ("--context", ctx, quill::train::trainer::MAX_CONTEXT),
                ("--width", width, 1 << 16),
                ("--layers", layers, 1 << 12),
                ("--heads", heads, 1 << 12),
                ("--kv-heads", a.kv_heads.unwrap_or(1), 1 << 12),
            ] {
                if v == 0 || v > max {
                    bail!("{flag} {v} is out of range (1 to {max})");
                }
            }
            let mut model = match a.arch.as_deref().unwrap_or("gpt2") {
                "gpt2" => {
                    if a.kv_heads.is_some() {
                        bail!("--kv-heads needs --arch llama (GPT-2 has one kv head per head)");
                    }
                    Model::new(Config::Gpt2(Gpt2Config::new(
                        tok.vocab_size(),
                        ctx,
                        width,
                        layers,
                        heads,
                    )))?
                }
                "llama" => {
                    if heads == 0 || !width.is_multiple_of(heads) {
                        bail!("--width ({width}) must be a multiple of --heads ({heads})");
                    }
                    let cfg = LlamaConfig::new(
                        tok.vocab_size(),
                        ctx,
                        width,
                        layers,
                        heads,
                        a.kv_heads.unwrap_or(heads),
                    );
                    Model::new(Config::Llama(cfg))?
                }
                other => bail!("--arch {other:?}: expected gpt2 or llama"),
            };
            model.init(a.seed.unwrap_or(1337));
            (model, tok)
        }
    };
    check_training_memory(model.layout.total)?;
    if tok.vocab_size() > model.vocab_size() {
        bail!(
            "the tokenizer has {} tokens but the model only {}",
            tok.vocab_size(),
            model.vocab_size()
        );
    }
    let data_dir = match &prepared_dir {
        Some(dir) => {
            let data_tok = Tokenizer::load(dir)?;
            if same_tokenizer(&data_tok, &tok).is_none() {
                bail!(
                    "the prepared data in {} use another tokenizer than the model",
                    dir.display()
                );
            }
            dir.clone()
        }
        None => {
            let dir = out.join("data");
            let started = std::time::Instant::now();
            let opts = PrepareOptions {
                val_fraction,
                lossy: a.lossy,
                ..Default::default()
            };
            let meta = prepare(&sources, &tok, &dir, &opts, &mut |_, _| {})?;
            eprintln!(
                "tokenized {:.1} MB into {} tokens in {:.1}s ({})",
                meta.bytes as f64 / 1e6,
                meta.train.tokens + meta.val.tokens,
                started.elapsed().as_secs_f64(),
                dir.display()
            );
            dir
        }
    };
    let (_, data) = load_prepared(&data_dir)?;
    let context = a.context.unwrap_or(model.context().min(1024));
    let lr = a.lr.unwrap_or(if a.init.is_some() { 3e-4 } else { 5e-3 });
    let config = TrainConfig {
        steps: a.steps.unwrap_or(5000),
        batch_size: a.batch.unwrap_or(16),
        seq_len: context,
        grad_accum: a.grad_accum.unwrap_or(1),
        lr,
        min_lr: a.min_lr.unwrap_or(lr / 50.0),
        warmup_steps: a.warmup.unwrap_or(200),
        weight_decay: a.weight_decay.unwrap_or(0.1),
        beta1: 0.9,
        beta2: 0.99,
        grad_clip: a.grad_clip.unwrap_or(1.0),
        eval_interval: a.eval_interval.unwrap_or(1000),
        seed: a.seed.unwrap_or(1337),
        sample_tokens: a.sample_tokens.unwrap_or(200),
    };
    let source = match (&prepared_dir, &a.data) {
        (Some(d), _) => format!("prepared data {}", d.display()),
        (None, Some(p)) => p.display().to_string(),
        (None, None) => EMBEDDED.to_string(),
    };
    let info = RunInfo {
        data: source.clone(),
        data_dir: std::fs::canonicalize(&data_dir).unwrap_or(data_dir.clone()),
        dtype: Some(precision.name().to_string()),
    };
    model.set_precision(precision);
    quill::io::atomic::write_text(&out.join("run.json"), &serde_json::to_string_pretty(&info)?)?;
    let decode = |ids: &[u32]| tok.decode(ids).unwrap_or_default();
    let mut info = tok_info(&tok, &decode)?;
    // a model fine-tuned from a folder keeps that folder's tokenizer settings (chat template)
    if let Some(dir) = &a.init {
        info.config_json = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok();
    }
    let mut trainer = Trainer::new(model, config, Data::Corpus(&data), &out, info, None)?;
    if comm.size() > 1 {
        // the files the other ranks open
        trainer.save(0.0)?;
        comm.barrier();
    }
    let trainer = a.ranks.distribute(trainer, comm)?;
    let header = corpus_line(&source, &data, trainer.model.vocab_size());
    drive(trainer, &a.drive_options(header, &out))
}

/// Some(()) when two tokenizers are the same (same tokenizer.json content).
fn same_tokenizer(a: &Tokenizer, b: &Tokenizer) -> Option<()> {
    let va: serde_json::Value = serde_json::from_str(&a.to_json().ok()?).ok()?;
    let vb: serde_json::Value = serde_json::from_str(&b.to_json().ok()?).ok()?;
    (va == vb).then_some(())
}

fn tok_info<'a>(
    tok: &Tokenizer,
    decode: &'a dyn Fn(&[u32]) -> String,
) -> Result<TokenizerInfo<'a>> {
    Ok(TokenizerInfo {
        json: tok.to_json()?,
        token_bytes: tok.token_bytes(),
        decode,
        sample_prompt: tok
            .encode("\n")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or(vec![0]),
        sample_stop: Vec::new(),
        config_json: None,
    })
}

/// The line that names the corpus of a new run.
fn corpus_line(source: &str, data: &quill::data::Split, vocab: usize) -> Option<String> {
    Some(format!(
        "corpus: {} ({} train / {} validation tokens, vocabulary {})",
        if source == EMBEDDED {
            "Tiny Shakespeare (embedded)"
        } else {
            source
        },
        data.train.len(),
        data.val.len(),
        vocab
    ))
}

impl TrainArgs {
    fn drive_options(&self, header: Option<String>, out: &Path) -> DriveOptions {
        DriveOptions {
            header,
            quiet: self.quiet,
            run: RunOptions {
                time_limit: self.time_limit,
                stop_after: self.stop_after,
            },
            final_sample: Some((600, 0.8)),
            command: "train",
            saved: "Hugging Face folder".into(),
            hint: format!(
                "quill generate --model {} --prompt \"ROMEO:\"",
                out.display()
            ),
            out: out.to_path_buf(),
            loss_log: self.ranks.loss_log.clone(),
        }
    }
}

/// The tokenizer of a new model, from `--tokenizer`.
fn new_tokenizer(spec: &str, sources: &[Source], lossy: bool) -> Result<Tokenizer> {
    if spec == "char" {
        return Ok(Tokenizer::Char(char_vocabulary(sources, lossy)?));
    }
    if let Some(n) = spec.strip_prefix("bpe:") {
        let n: usize = n
            .parse()
            .with_context(|| format!("--tokenizer {spec}: expected bpe:N with N a number"))?;
        let mut temp = None;
        let files: Vec<PathBuf> = sources
            .iter()
            .map(|s| match s {
                Source::File(p) => Ok(p.clone()),
                Source::Text { text, .. } => {
                    let p = std::env::temp_dir()
                        .join(format!("quill-corpus-{}.txt", std::process::id()));
                    std::fs::write(&p, text)
                        .with_context(|| format!("cannot write {}", p.display()))?;
                    temp = Some(p.clone());
                    Ok(p)
                }
            })
            .collect::<Result<_>>()?;
        let tok = train_byte_level_bpe(&files, n);
        if let Some(p) = temp {
            let _ = std::fs::remove_file(p);
        }
        return Ok(tok?);
    }
    Ok(Tokenizer::from_spec(spec)?)
}

/// The file `name` of the run saved in `out`, read to resume it (`resume`: the user asked
/// to), or by a rank other than 0 to open the run rank 0 has just written.
pub(crate) fn read_run_file(
    out: &Path,
    name: &str,
    resume: bool,
    comm: &dyn Comm,
) -> Result<String> {
    std::fs::read_to_string(out.join(name)).with_context(|| {
        if resume || comm.rank() == 0 {
            format!("nothing to resume in {} (no {name})", out.display())
        } else {
            format!(
                "rank {} cannot read the run rank 0 wrote in {}: --out must be a folder every rank sees (a shared file system)",
                comm.rank(),
                out.display()
            )
        }
    })
}

fn resume(a: TrainArgs, out: &Path, comm: Rc<dyn Comm>) -> Result<()> {
    let lead = comm.rank() == 0;
    let run_info_path = out.join("run.json");
    let text = read_run_file(out, "run.json", a.resume, &*comm)?;
    let info: RunInfo = serde_json::from_str(&text)
        .with_context(|| format!("{} is damaged", run_info_path.display()))?;
    let given = [
        a.arch.is_some(),
        a.kv_heads.is_some(),
        a.layers.is_some(),
        a.heads.is_some(),
        a.width.is_some(),
        a.context.is_some(),
        a.steps.is_some(),
        a.batch.is_some(),
        a.grad_accum.is_some(),
        a.lr.is_some(),
        a.min_lr.is_some(),
        a.warmup.is_some(),
        a.weight_decay.is_some(),
        a.grad_clip.is_some(),
        a.eval_interval.is_some(),
        a.seed.is_some(),
        a.val_fraction.is_some(),
        a.data.is_some(),
        a.tokenizer.is_some(),
    ];
    if lead && a.resume && given.iter().any(|&g| g) {
        eprintln!("warning: --resume continues with the saved run's data and settings; the data, model and schedule flags given are ignored");
    }
    let precision = parse_dtype(
        a.dtype
            .as_deref()
            .or(info.dtype.as_deref())
            .unwrap_or("f32"),
    )?;
    let mut model = quill::io::hf::load(out, false)?;
    model.set_precision(precision);
    if lead {
        check_writable(out)?;
    }
    let tok = Tokenizer::load(out)?;
    let (_, data) = load_prepared(&info.data_dir)?;
    let decode = |ids: &[u32]| tok.decode(ids).unwrap_or_default();
    let mut info = tok_info(&tok, &decode)?;
    info.config_json = std::fs::read_to_string(out.join("tokenizer_config.json")).ok();
    let trainer = Trainer::resume(model, Data::Corpus(&data), out, info, None)?;
    if lead && a.resume {
        eprintln!("resuming {} at step {}", out.display(), trainer.step());
    }
    let trainer = a.ranks.distribute(trainer, comm)?;
    drive(trainer, &a.drive_options(None, out))
}

/// How [`drive`] shows a run: what it prints before, during and after.
pub(crate) struct DriveOptions {
    /// A line describing the data (new runs).
    pub header: Option<String>,
    pub quiet: bool,
    pub run: RunOptions,
    /// Tokens and temperature of the sample printed at the end (None: no sample).
    pub final_sample: Option<(usize, f32)>,
    /// The subcommand, for the --resume hint.
    pub command: &'static str,
    /// What the output folder holds.
    pub saved: String,
    /// What to try next, printed at the end.
    pub hint: String,
    pub out: PathBuf,
    /// Where each step's loss goes (--loss-log).
    pub loss_log: Option<PathBuf>,
}

/// Runs a trainer to its end (or a stop) with a progress bar, evaluation lines and samples.
pub(crate) fn drive(mut trainer: Trainer, d: &DriveOptions) -> Result<()> {
    let out = d.out.as_path();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
        });
    }
    let cfg = trainer.config.clone();
    if trainer.rank() != 0 {
        // the other ranks train in silence: rank 0 speaks for the run
        return trainer.run(&d.run, &stop, &mut |_| {}).map_err(Into::into);
    }
    let mut loss_log = match &d.loss_log {
        Some(p) => {
            Some(std::fs::File::create(p).with_context(|| format!("--loss-log {}", p.display()))?)
        }
        None => None,
    };
    if let Some(h) = &d.header {
        eprintln!("{h}");
    }
    if trainer.ranks() > 1 {
        let per = cfg.batch_size / trainer.ranks();
        eprintln!(
            "data-parallel: {}; {per} of each batch's {} sequences per rank; AdamW moments {:.1} MB per rank ({})",
            trainer.describe_ranks(),
            cfg.batch_size,
            trainer.optimizer_bytes() as f64 / 1e6,
            if trainer.zero() {
                "ZeRO-1: sharded over the ranks"
            } else {
                "whole on every rank"
            }
        );
    }
    eprintln!(
        "model: {}, context {}; {} products; {} threads, {} kernels",
        trainer.model.describe(),
        cfg.seq_len,
        match trainer.model.precision() {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16 mixed-precision",
        },
        rayon::current_num_threads(),
        quill::kernels::simd::level()
    );
    eprintln!(
        "training: {} steps of {} x {} x {} tokens, lr {} (warm-up {}, cosine to {}), AdamW wd {}",
        cfg.steps,
        cfg.grad_accum,
        cfg.batch_size,
        cfg.seq_len,
        cfg.lr,
        cfg.warmup_steps,
        cfg.min_lr,
        cfg.weight_decay
    );
    let pb = if d.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(cfg.steps as u64)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_position(trainer.step() as u64);
    pb.reset_eta();
    let started = Instant::now();
    let mut smoothed: Option<f64> = None;
    let mut final_val = None;
    let quiet = d.quiet;
    trainer.run(&d.run, &stop, &mut |ev| match ev {
        Event::Step {
            step,
            loss,
            tokens_per_sec,
            lr,
            ..
        } => {
            if let Some(f) = &mut loss_log {
                use std::io::Write;
                let line = serde_json::json!({"step": step, "loss": loss, "lr": lr});
                let _ = writeln!(f, "{line}");
            }
            let s = smoothed.map_or(loss, |s| 0.9 * s + 0.1 * loss);
            smoothed = Some(s);
            pb.set_position(step as u64);
            pb.set_message(format!(
                "loss {s:.3}  {:.1}k tok/s  lr {lr:.2e}",
                tokens_per_sec / 1e3
            ));
        }
        Event::EvalStart { .. } => pb.set_message("evaluating on the validation split..."),
        Event::Eval(m) => {
            final_val = Some(m.val_loss);
            let line = format!(
                "step {:>5}: train {:.4}  val {:.4} ({:.3} bits/byte)  {:.1}k tok/s  {:.0}s",
                m.step,
                m.train_loss,
                m.val_loss,
                m.val_bpb,
                m.tokens_per_sec / 1e3,
                m.elapsed_s
            );
            if quiet {
                eprintln!("{line}");
            } else {
                pb.println(line);
            }
        }
        Event::Sample { text, .. } => {
            let indented: String = text
                .lines()
                .take(6)
                .map(|l| format!("    | {l}\n"))
                .collect();
            if quiet {
                eprint!("{indented}");
            } else {
                pb.println(indented.trim_end());
            }
        }
        Event::Saved { .. } => {}
        Event::Stopped { step, reason } => {
            let line = format!(
                "stopped at step {step}: {reason}; continue with `quill {} --resume --out {}`",
                d.command,
                out.display()
            );
            if quiet {
                eprintln!("{line}");
            } else {
                pb.println(line);
            }
        }
    })?;
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    if trainer.step() >= cfg.steps {
        println!(
            "\ntrained {} steps in {:.0}s{}",
            cfg.steps,
            secs,
            final_val
                .map(|v| format!("; validation loss {v:.4} nats/token"))
                .unwrap_or_default()
        );
        if let Some((n, temperature)) = d.final_sample {
            println!("--- sample (temperature {temperature}) ---");
            println!("{}", trainer.sample_text(n, temperature, 1)?);
            println!("--------------------------------");
        }
    }
    println!(
        "model saved to {} ({}; metrics.jsonl, loss.svg)\ntry: {}",
        out.display(),
        d.saved,
        d.hint
    );
    Ok(())
}
