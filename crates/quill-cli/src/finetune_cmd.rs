//! `quill finetune`: a pretrained model taught from JSONL records (conversations or
//! prompt/completion pairs), with the loss on the response tokens only and short examples
//! packed into full windows. The run writes what `quill train` writes (a Hugging Face folder,
//! metrics.jsonl, loss.svg, atomic checkpoints) and resumes exactly.

use crate::train_cmd::{
    check_rates, check_training_memory, check_writable, drive, on_ranks, parse_dtype,
    read_run_file, DriveOptions, RankArgs,
};
use anyhow::{bail, Context, Result};
use quill::chat::ChatTemplate;
use quill::data::sft::{self, Example, Format, Packed};
use quill::model::lora::{Lora, LoraConfig, Target, ALL_TARGETS};
use quill::tokenizer::Tokenizer;
use quill::train::dist::Comm;
use quill::train::trainer::{Adapters, Data, TokenizerInfo, MAX_CONTEXT};
use quill::train::{RunOptions, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::rc::Rc;

#[derive(clap::Args, Debug)]
pub struct FinetuneArgs {
    /// The model to start from: a Hugging Face folder, a GGUF file (dequantized to f32 for full
    /// fine-tuning; kept quantized under LoRA), or a llama2.c checkpoint with --tokenizer.
    #[arg(long, required_unless_present = "resume")]
    model: Option<PathBuf>,
    /// The tokenizer.bin of a llama2.c checkpoint.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// JSONL records: {"messages": [{"role", "content"}, ...]} (rendered with the model's
    /// chat template; the assistant's turns are learned), {"prompt", "completion"} (the
    /// completion and an end-of-text token are learned) or {"text"} (all learned); or a .tsv
    /// file of source<TAB>target pairs (see --instruction).
    #[arg(long, required_unless_present = "resume")]
    data: Option<PathBuf>,
    /// For .tsv pairs: the user asks "INSTRUCTION source" and the assistant answers target.
    #[arg(long, default_value = "Translate to French:")]
    instruction: String,
    /// For .tsv pairs: a system message before each request.
    #[arg(long)]
    system: Option<String>,
    /// For .tsv pairs: plain text instead of a conversation, e.g. 'English: {source}\nFrench:
    /// {target}' (\n a newline); the target and an end token are learned.
    #[arg(long, conflicts_with_all = ["system", "instruction"])]
    pair_template: Option<String>,
    /// Validation records (same format) [default: --val-fraction of --data, held out].
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// Fraction of the records held out for validation when there is no --val-data
    /// [default: 0.1].
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Output folder: a Hugging Face model folder plus training state, metrics.jsonl and loss.svg.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run saved in --out, exactly where it stopped.
    #[arg(long)]
    resume: bool,
    /// Replace a run already saved in --out instead of refusing.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Window length in tokens; examples are packed into windows of this length, and longer
    /// ones are left out (with a warning) [default: the longest example rounded up to 64,
    /// at least 256, at most 2048 and the model's context].
    #[arg(long)]
    context: Option<usize>,
    /// Passes over the training examples (sets --steps) [default: 1].
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<f64>,
    /// Optimizer steps [default: one epoch].
    #[arg(long)]
    steps: Option<usize>,
    /// Windows per micro-batch [default: 8].
    #[arg(long)]
    batch: Option<usize>,
    /// Micro-batches per optimizer step (gradient accumulation) [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Peak learning rate [default: 2e-5].
    #[arg(long)]
    lr: Option<f32>,
    /// Final learning rate of the cosine decay [default: lr / 10].
    #[arg(long)]
    min_lr: Option<f32>,
    /// Linear warm-up steps [default: a tenth of the steps, at most 100].
    #[arg(long)]
    warmup: Option<usize>,
    /// AdamW weight decay, on matrices only [default: 0].
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Clip the gradient's global norm to this (0: no clipping) [default: 1.0].
    #[arg(long)]
    grad_clip: Option<f32>,
    /// Evaluate on the validation records, print a sample answer and save every N steps
    /// [default: a quarter of the steps].
    #[arg(long)]
    eval_interval: Option<usize>,
    /// Random seed for the validation split and the order of the examples [default: 1337].
    #[arg(long)]
    seed: Option<u64>,
    /// Tokens of the sample answer printed at each evaluation [default: 64].
    #[arg(long)]
    sample_tokens: Option<usize>,
    /// Stop (saving a checkpoint) after this many seconds; resume later with --resume.
    #[arg(long)]
    time_limit: Option<f64>,
    /// Stop (saving a checkpoint) after this many steps of this invocation.
    #[arg(long)]
    stop_after: Option<usize>,
    /// No progress bar (log lines only).
    #[arg(long)]
    quiet: bool,
    /// Matrix-product operands: f32 or bf16 (mixed precision) [default: f32].
    #[arg(long)]
    dtype: Option<String>,
    /// Train LoRA adapters of this rank beside the frozen model instead of every weight;
    /// the run saves a PEFT adapter (use it with --adapter, or `quill merge`).
    #[arg(long)]
    lora_rank: Option<usize>,
    /// LoRA's alpha: the adapters' output is scaled by alpha / rank [default: 2 × rank].
    #[arg(long, requires = "lora_rank")]
    lora_alpha: Option<f32>,
    /// Dropout on the adapters' inputs while training [default: 0].
    #[arg(long, requires = "lora_rank")]
    lora_dropout: Option<f32>,
    /// Projections that get adapters, comma-separated: q, k, v, o, gate, up, down
    /// [default: all seven].
    #[arg(long, requires = "lora_rank", value_delimiter = ',')]
    lora_targets: Option<Vec<String>>,
    /// rsLoRA: scale by alpha / √rank instead of alpha / rank.
    #[arg(long, requires = "lora_rank")]
    rslora: bool,
    /// LoRA+: the B matrices learn at RATIO × --lr (A at --lr) [default: 1, plain LoRA].
    #[arg(long, value_name = "RATIO", requires = "lora_rank")]
    lora_plus: Option<f32>,
    /// Print the first N training records as they will be learned (one JSON line each: the
    /// ids, which of them are learned, and the text with the learned parts in ⟦ ⟧), then
    /// stop without training.
    #[arg(long, value_name = "N")]
    preview: Option<usize>,
    #[command(flatten)]
    ranks: RankArgs,
}

/// What a resumed run needs to rebuild the same windows (finetune.json in --out).
#[derive(Serialize, Deserialize)]
struct FinetuneInfo {
    model: PathBuf,
    data: PathBuf,
    val_data: Option<PathBuf>,
    val_fraction: f64,
    context: usize,
    seed: u64,
    eos: Option<u32>,
    pad: u32,
    dtype: String,
    /// How .tsv pairs become conversations.
    #[serde(default)]
    instruction: String,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    pair_template: Option<String>,
    /// The llama2.c tokenizer of the base, if any.
    #[serde(default)]
    tokenizer: Option<PathBuf>,
    /// LoRA's settings (None: every weight trains).
    #[serde(default)]
    lora: Option<LoraSettings>,
}

/// The LoRA flags, kept for --resume.
#[derive(Clone, Serialize, Deserialize)]
struct LoraSettings {
    rank: usize,
    alpha: f32,
    dropout: f32,
    targets: Vec<String>,
    rslora: bool,
    #[serde(default = "plain_lora")]
    plus_ratio: f32,
}

fn plain_lora() -> f32 {
    1.0
}

impl LoraSettings {
    fn config(&self) -> Result<LoraConfig> {
        Ok(LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: self
                .targets
                .iter()
                .map(|t| Target::parse(t.trim()))
                .collect::<quill::Result<Vec<_>>>()?,
            rslora: self.rslora,
            plus_ratio: self.plus_ratio,
        })
    }
}

const INFO_FILE: &str = "finetune.json";

impl FinetuneInfo {
    fn pairs(&self) -> Result<sft::Pairs> {
        Ok(sft::Pairs {
            instruction: self.instruction.clone(),
            system: self.system.clone(),
            template: (self.pair_template.as_deref())
                .map(sft::PairTemplate::parse)
                .transpose()?,
        })
    }
}

/// The model's end-of-text token: the first of its end ids, or the tokenizer's
/// `<|endoftext|>` / `</s>` / `<|im_end|>`.
fn end_token(eos: &[u32], tok: &Tokenizer) -> Option<u32> {
    eos.first().copied().or_else(|| {
        ["<|endoftext|>", "</s>", "<|im_end|>", "<|eot_id|>"]
            .iter()
            .find_map(|t| tok.token_to_id(t))
    })
}

/// tokenizer_config.json for the output folder: the base folder's, with its chat template
/// and special tokens written in (a GGUF base has them in its metadata only).
pub(crate) fn tokenizer_config(base: &Path, template: Option<&ChatTemplate>) -> Result<String> {
    let path = base.join("tokenizer_config.json");
    let mut cfg: Value = if base.is_dir() && path.is_file() {
        serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{}: not valid JSON", path.display()))?
    } else {
        serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false
        })
    };
    if let (Some(t), Some(obj)) = (template, cfg.as_object_mut()) {
        obj.insert("chat_template".into(), Value::String(t.source().into()));
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let (false, Some(s)) = (obj.contains_key(key), t.special_token(key)) {
                obj.insert(key.into(), Value::String(s.into()));
            }
        }
    }
    Ok(serde_json::to_string_pretty(&cfg)? + "\n")
}

/// The records of `info`, packed: (train, validation, examples of each, what was left out).
struct Windows {
    train: Packed,
    val: Packed,
    counts: (usize, usize),
}

/// The packed windows of a run; `warn`: say which records are left out (rank 0 alone does).
fn windows(info: &FinetuneInfo, format: &Format, warn: bool) -> Result<Windows> {
    let all = sft::read_jsonl(&info.data, format)?;
    let (train, val) = match &info.val_data {
        Some(p) => (all, sft::read_jsonl(p, format)?),
        None => sft::split(all, info.val_fraction, info.seed),
    };
    let pack = |ex: &[Example], what: &str, path: &Path| -> Result<Packed> {
        let (p, left) = sft::pack(ex, info.context, info.pad);
        if p.is_empty() && what == "training" {
            bail!(
                "{}: no training record fits a {}-token window with something to learn ({} longer, {} with no response)",
                path.display(),
                info.context,
                left.too_long.len(),
                left.nothing_learned.len()
            );
        }
        if let Some(first) = left.too_long.first().filter(|_| warn) {
            eprintln!(
                "warning: {} {what} record(s) are longer than the {}-token window and are left out (first: {}, line {first}); raise --context to keep them",
                left.too_long.len(),
                info.context,
                path.display()
            );
        }
        if let Some(first) = left.nothing_learned.first().filter(|_| warn) {
            eprintln!(
                "warning: {} {what} record(s) have no response tokens to learn and are left out (first: {}, line {first})",
                left.nothing_learned.len(),
                path.display()
            );
        }
        Ok(p)
    };
    let val_path = info.val_data.as_deref().unwrap_or(&info.data);
    Ok(Windows {
        train: pack(&train, "training", &info.data)?,
        val: pack(&val, "validation", val_path)?,
        counts: (train.len(), val.len()),
    })
}

/// The default window: the longest example rounded up to 64 tokens, within [256, 2048] and
/// the model's context.
fn default_context(info: &FinetuneInfo, format: &Format, model_context: usize) -> Result<usize> {
    let longest = sft::read_jsonl(&info.data, format)?
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(1);
    Ok(longest
        .div_ceil(64)
        .saturating_mul(64)
        .clamp(256, 2048)
        .min(model_context))
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    let comm = quill::train::dist::from_env()?;
    on_ranks(comm, |comm| run_rank(a, comm))
}

/// `quill finetune` on one rank: as `quill train`, rank 0 makes the run's folder and the
/// other ranks open it as a resumed run.
fn run_rank(a: FinetuneArgs, comm: Rc<dyn Comm>) -> Result<()> {
    if a.preview.is_some() && comm.size() > 1 {
        bail!("--preview only prints records: run it without mpirun");
    }
    if a.resume || comm.rank() != 0 {
        if !a.resume {
            comm.barrier();
        }
        return resume(&a, &a.out.clone(), comm);
    }
    check_rates(&[
        ("--lr", a.lr),
        ("--min-lr", a.min_lr),
        ("--weight-decay", a.weight_decay),
        ("--grad-clip", a.grad_clip),
    ])?;
    if let Some(e) = a.epochs {
        if !e.is_finite() || e <= 0.0 || e > 1e6 {
            bail!("--epochs must be a number above 0 (got {e})");
        }
    }
    if let Some(f) = a.val_fraction {
        if !(0.0..1.0).contains(&f) {
            bail!("--val-fraction must be at least 0 and below 1 (got {f})");
        }
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
    let (base, data) = (
        a.model.clone().expect("clap"),
        a.data.clone().expect("clap"),
    );
    let precision = parse_dtype(a.dtype.as_deref().unwrap_or("f32"))?;
    check_writable(&out)?;
    let opened = quill::io::open(&base, a.tokenizer.as_deref())
        .with_context(|| format!("--model {}", base.display()))?;
    let quill::io::Opened {
        mut model,
        tok,
        template,
        eos,
        ..
    } = opened;
    let lora_settings = a.lora_rank.map(|rank| LoraSettings {
        rank,
        alpha: a.lora_alpha.unwrap_or(2.0 * rank as f32),
        dropout: a.lora_dropout.unwrap_or(0.0),
        targets: a
            .lora_targets
            .clone()
            .unwrap_or_else(|| ALL_TARGETS.iter().map(|t| t.module().to_string()).collect()),
        rslora: a.rslora,
        plus_ratio: a.lora_plus.unwrap_or(1.0),
    });
    let lora = match &lora_settings {
        Some(ls) => {
            let mut l = Lora::new(&model, ls.config()?)?;
            l.init(a.seed.unwrap_or(1337));
            Some(Adapters::new(l, base.display().to_string()))
        }
        None => {
            check_training_memory(model.layout.total)?;
            None
        }
    };
    let tok_json = tok.to_json().with_context(|| {
        "the fine-tuned model is saved as a Hugging Face folder, which needs a tokenizer.json"
    })?;
    let eos = end_token(&eos, &tok);
    // absolute, so that --resume finds them from anywhere
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or(p.to_path_buf());
    let mut info = FinetuneInfo {
        model: absolute(&base),
        data: absolute(&data),
        val_data: a.val_data.as_deref().map(absolute),
        val_fraction: a.val_fraction.unwrap_or(0.1),
        context: 0,
        seed: a.seed.unwrap_or(1337),
        eos,
        pad: eos.unwrap_or(0),
        dtype: precision.name().to_string(),
        tokenizer: a.tokenizer.as_deref().map(absolute),
        lora: lora_settings,
        instruction: a.instruction.clone(),
        system: a.system.clone(),
        pair_template: a.pair_template.clone(),
    };
    let format = Format {
        tok: &tok,
        template: template.as_ref(),
        eos,
        pairs: info.pairs()?,
    };
    info.context = match a.context {
        Some(c) if c == 0 || c > MAX_CONTEXT => {
            bail!("--context {c} is out of range (1 to {MAX_CONTEXT})")
        }
        Some(c) if c > model.context() => bail!(
            "--context {c} is longer than the model's {} positions",
            model.context()
        ),
        Some(c) => c,
        None => default_context(&info, &format, model.context())?,
    };
    if let Some(n) = a.preview {
        return preview(&info, &format, n);
    }
    let w = windows(&info, &format, true)?;
    let batch = a.batch.unwrap_or(8);
    let accum = a.grad_accum.unwrap_or(1);
    let per_step = batch.saturating_mul(accum).max(1);
    let steps = match a.steps {
        Some(s) => s,
        None => {
            let epochs = a.epochs.unwrap_or(1.0);
            ((w.train.len() as f64 * epochs / per_step as f64).ceil() as usize).max(1)
        }
    };
    let lr =
        a.lr.unwrap_or(if info.lora.is_some() { 2e-4 } else { 2e-5 });
    let config = TrainConfig {
        steps,
        batch_size: batch,
        seq_len: info.context,
        grad_accum: accum,
        lr,
        min_lr: a.min_lr.unwrap_or(lr / 10.0),
        warmup_steps: a.warmup.unwrap_or((steps / 10).min(100)),
        weight_decay: a.weight_decay.unwrap_or(0.0),
        beta1: 0.9,
        beta2: 0.999,
        grad_clip: a.grad_clip.unwrap_or(1.0),
        eval_interval: a.eval_interval.unwrap_or(steps.div_ceil(4).max(1)),
        seed: info.seed,
        sample_tokens: a.sample_tokens.unwrap_or(64),
    };
    config.validate()?;
    let header = format!(
        "data: {} training records in {} windows of {} tokens ({:.0}% learned tokens), {} validation records in {} windows",
        w.counts.0,
        w.train.len(),
        info.context,
        100.0 * w.train.learned as f64 / w.train.ids.len().max(1) as f64,
        w.counts.1,
        w.val.len()
    );
    let header = match &lora {
        Some(l) => format!(
            "{header}\nLoRA: rank {}, alpha {}{}{}, on {}: {} trainable parameters ({:.2}% of the model's {})",
            l.lora.config.rank,
            l.lora.config.alpha,
            if l.lora.config.rslora { " (rsLoRA)" } else { "" },
            if l.lora.config.plus_ratio == 1.0 {
                String::new()
            } else {
                format!(", LoRA+ ratio {}", l.lora.config.plus_ratio)
            },
            l.lora
                .config
                .targets
                .iter()
                .map(|t| t.module())
                .collect::<Vec<_>>()
                .join(", "),
            l.lora.params.len(),
            100.0 * l.lora.params.len() as f64 / model.layout.total as f64,
            model.layout.total
        ),
        None => header,
    };
    quill::io::atomic::write_text(&out.join(INFO_FILE), &serde_json::to_string_pretty(&info)?)?;
    model.set_precision(precision);
    let config_json = tokenizer_config(&base, template.as_ref())?;
    let decode = |ids: &[u32]| tok.decode(ids).unwrap_or_default();
    let tinfo = token_info(&tok, tok_json, config_json, &w.val, &info, &decode);
    let mut trainer = Trainer::new(
        model,
        config,
        Data::Examples {
            train: &w.train,
            val: &w.val,
        },
        &out,
        tinfo,
        lora,
    )?;
    if comm.size() > 1 {
        // the files the other ranks open
        trainer.save(0.0)?;
        comm.barrier();
    }
    let trainer = a.ranks.distribute(trainer, comm)?;
    drive(trainer, &a.drive_options(Some(header), &out, &info))
}

/// `--preview N`: the first N records of --data as tokens, learned mask and marked text.
fn preview(info: &FinetuneInfo, format: &Format, n: usize) -> Result<()> {
    let examples = sft::read_jsonl(&info.data, format)?;
    for e in examples.iter().take(n) {
        let mut text = String::new();
        let mut i = 0;
        while i < e.ids.len() {
            let learned = e.learn[i];
            let j = (i..e.ids.len())
                .find(|&j| e.learn[j] != learned)
                .unwrap_or(e.ids.len());
            let piece = format.tok.decode(&e.ids[i..j])?;
            if learned {
                text.push_str(&format!("⟦{piece}⟧"));
            } else {
                text.push_str(&piece);
            }
            i = j;
        }
        let line = serde_json::json!({
            "line": e.line,
            "ids": e.ids,
            "learn": e.learn,
            "text": text,
            "fits": e.ids.len() <= info.context,
        });
        println!("{line}");
    }
    Ok(())
}

/// What the trainer needs of the tokenizer; samples answer the first validation example's
/// prompt (its tokens before the first learned one) and stop at the end token.
fn token_info<'a>(
    tok: &Tokenizer,
    json: String,
    config_json: String,
    val: &Packed,
    info: &FinetuneInfo,
    decode: &'a dyn Fn(&[u32]) -> String,
) -> TokenizerInfo<'a> {
    let prompt = if val.is_empty() {
        Vec::new()
    } else {
        let (ids, targets, starts) = val.window(0);
        let end = (0..ids.len())
            .take_while(|&i| starts[i] == 0)
            .find(|&i| targets[i] != quill::kernels::crossentropy::IGNORE)
            .map_or(0, |i| i + 1);
        ids[..end].to_vec()
    };
    TokenizerInfo {
        json,
        token_bytes: tok.token_bytes(),
        decode,
        sample_prompt: if prompt.is_empty() {
            tok.encode("\n").unwrap_or_default()
        } else {
            prompt
        },
        sample_stop: info.eos.into_iter().collect(),
        config_json: Some(config_json),
    }
}

impl FinetuneArgs {
    fn drive_options(
        &self,
        header: Option<String>,
        out: &Path,
        info: &FinetuneInfo,
    ) -> DriveOptions {
        DriveOptions {
            header,
            quiet: self.quiet,
            run: RunOptions {
                time_limit: self.time_limit,
                stop_after: self.stop_after,
            },
            final_sample: None,
            command: "finetune",
            saved: match info.lora {
                Some(_) => "LoRA adapter in PEFT's format".into(),
                None => "Hugging Face folder".into(),
            },
            hint: match (&info.lora, &info.pair_template) {
                (_, Some(t)) => {
                    let model = match info.lora {
                        Some(_) => format!("{} --adapter {}", info.model.display(), out.display()),
                        None => out.display().to_string(),
                    };
                    format!("quill generate --model {model} --prompt TEXT   (TEXT as --pair-template '{t}' writes it, up to {{target}})")
                }
                (Some(_), None) => format!(
                    "quill chat --model {} --adapter {}   (or `quill merge` for a merged model folder)",
                    info.model.display(),
                    out.display()
                ),
                (None, None) => format!("quill chat --model {}", out.display()),
            },
            out: out.to_path_buf(),
            loss_log: self.ranks.loss_log.clone(),
        }
    }
}

fn resume(a: &FinetuneArgs, out: &Path, comm: Rc<dyn Comm>) -> Result<()> {
    let lead = comm.rank() == 0;
    let path = out.join(INFO_FILE);
    let text = read_run_file(out, INFO_FILE, a.resume, &*comm)?;
    let info: FinetuneInfo =
        serde_json::from_str(&text).with_context(|| format!("{}: damaged", path.display()))?;
    if lead && a.resume && (a.model.is_some() || a.data.is_some()) {
        eprintln!("warning: --resume continues with the saved run's model and data; --model and --data are ignored");
    }
    if lead {
        check_writable(out)?;
    }
    // full fine-tuning resumes from the saved folder; LoRA from the base, which stays frozen
    let (mut model, tok, template, lora) = match &info.lora {
        Some(ls) => {
            let o = quill::io::open(&info.model, info.tokenizer.as_deref())
                .with_context(|| format!("the base model of this run, {}", info.model.display()))?;
            let l = Lora::new(&o.model, ls.config()?)?;
            let adapters = Adapters::new(l, info.model.display().to_string());
            (o.model, o.tok, o.template, Some(adapters))
        }
        None => (
            quill::io::hf::load(out, false)?,
            Tokenizer::load(out)?,
            ChatTemplate::load(out)?,
            None,
        ),
    };
    model.set_precision(parse_dtype(&info.dtype)?);
    let format = Format {
        tok: &tok,
        template: template.as_ref(),
        eos: info.eos,
        pairs: info.pairs()?,
    };
    let w = windows(&info, &format, lead)?;
    let config_json = std::fs::read_to_string(out.join("tokenizer_config.json"))?;
    let decode = |ids: &[u32]| tok.decode(ids).unwrap_or_default();
    let tinfo = token_info(&tok, tok.to_json()?, config_json, &w.val, &info, &decode);
    let data = Data::Examples {
        train: &w.train,
        val: &w.val,
    };
    let trainer = Trainer::resume(model, data, out, tinfo, lora)?;
    if lead && a.resume {
        eprintln!("resuming {} at step {}", out.display(), trainer.step());
    }
    let trainer = a.ranks.distribute(trainer, comm)?;
    drive(trainer, &a.drive_options(None, out, &info))
}

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// The base model: a Hugging Face folder, a GGUF file, or a llama2.c checkpoint with
    /// --tokenizer.
    #[arg(long)]
    model: PathBuf,
    /// The tokenizer of a llama2.c checkpoint.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The LoRA adapter folder (PEFT's format, as `quill finetune --lora-rank` writes it).
    #[arg(long)]
    adapter: PathBuf,
    /// The Hugging Face folder to write: config.json, model.safetensors (f32), tokenizer
    /// files, generation_config.json.
    #[arg(long)]
    out: PathBuf,
}

/// `quill merge`: base + adapter written as one Hugging Face model folder.
pub fn merge(a: MergeArgs) -> Result<()> {
    if a.out.join("model.safetensors").exists() || a.out.join("config.json").exists() {
        bail!(
            "{} already holds a model; choose another --out",
            a.out.display()
        );
    }
    let o = quill::io::open_adapted(&a.model, a.tokenizer.as_deref(), Some(&a.adapter))?;
    let json = o.tok.to_json().with_context(|| {
        "a Hugging Face folder needs a tokenizer.json, and this model's tokenizer has none"
    })?;
    check_writable(&a.out)?;
    let mut meta = std::collections::BTreeMap::new();
    meta.insert("quill_adapter".to_string(), a.adapter.display().to_string());
    quill::io::hf::save(&a.out, &o.model, &meta)?;
    quill::io::atomic::write_text(&a.out.join("tokenizer.json"), &json)?;
    quill::io::atomic::write_text(
        &a.out.join("tokenizer_config.json"),
        &tokenizer_config(&a.model, o.template.as_ref())?,
    )?;
    let gen = a.model.join("generation_config.json");
    if a.model.is_dir() && gen.is_file() {
        quill::io::atomic::write_text(
            &a.out.join("generation_config.json"),
            &std::fs::read_to_string(&gen)?,
        )?;
    } else if !o.eos.is_empty() {
        let g = serde_json::json!({ "eos_token_id": o.eos });
        quill::io::atomic::write_text(
            &a.out.join("generation_config.json"),
            &(serde_json::to_string_pretty(&g)? + "\n"),
        )?;
    }
    println!(
        "merged {} into {}: {} (f32, {} parameters)",
        a.adapter.display(),
        a.model.display(),
        a.out.display(),
        o.model.layout.total
    );
    Ok(())
}
