//! The training loop: sample a batch, forward, cross-entropy, backward, clip, AdamW; every
//! `eval_interval` steps measure the whole validation split, write a metrics line, a sample
//! and a checkpoint.

use super::checkpoint;
use super::dist::{self, Comm, DataParallel};
use super::optimizer::AdamW;
use super::plot::loss_svg;
use super::schedule::Schedule;
use crate::data::sft::{epoch_order, Packed};
use crate::data::{eval_batch, eval_windows, sample_rows, Split};
use crate::io::atomic::write_text;
use crate::kernels::crossentropy::IGNORE;
use crate::model::lora::{Lora, LoraActs};
use crate::model::{Activations, Batch, Model};
use crate::rng::Rng;
use crate::sample::{generate, Sampler, SamplingParams, Stop};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// AdamW's first and second moments (a resumed run's).
type Moments = (Vec<f32>, Vec<f32>);

/// Everything that decides the numbers of a run (saved with each checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: usize,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub grad_clip: f32,
    pub eval_interval: usize,
    pub seed: u64,
    /// Characters (tokens) of sample text written at each evaluation (0: none).
    pub sample_tokens: usize,
}

/// The longest training context quill accepts.
pub const MAX_CONTEXT: usize = 1 << 20;
/// The most tokens in one step's batch.
pub const MAX_BATCH_TOKENS: usize = 1 << 24;

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("steps", self.steps),
            ("batch size", self.batch_size),
            ("context", self.seq_len),
            ("gradient accumulation", self.grad_accum),
            ("eval interval", self.eval_interval),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::Input(format!("{name} must be positive")));
            }
        }
        if !self.lr.is_finite() || self.lr <= 0.0 || !self.min_lr.is_finite() || self.min_lr < 0.0 {
            return Err(Error::Input(
                "learning rates must be positive numbers".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err(Error::Input("AdamW betas must be in [0, 1)".into()));
        }
        for (name, v) in [
            ("weight decay", self.weight_decay),
            ("gradient clip", self.grad_clip),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::Input(format!(
                    "{name} must be a finite number ≥ 0 (got {v})"
                )));
            }
        }
        // tokens of one step's activations, a stated limit well past any machine's memory
        let tokens = self.batch_size.checked_mul(self.seq_len);
        if self.seq_len > MAX_CONTEXT || tokens.is_none_or(|t| t > MAX_BATCH_TOKENS) {
            return Err(Error::Input(format!(
                "a batch of {} sequences of {} tokens is beyond quill's limits (context ≤ {MAX_CONTEXT}, batch × context ≤ {MAX_BATCH_TOKENS})",
                self.batch_size, self.seq_len
            )));
        }
        Ok(())
    }
}

/// Options of this invocation that do not change the numbers.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stop (and save) once this many seconds have been spent in this invocation.
    pub time_limit: Option<f64>,
    /// Stop (and save) after this many steps in this invocation.
    pub stop_after: Option<usize>,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    pub step: usize,
    pub tokens: u64,
    pub train_loss: f64,
    pub val_loss: f64,
    pub val_bpb: f64,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens_per_sec: f64,
    pub elapsed_s: f64,
}

/// The trainer's resumable state (beyond parameters and moments).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct State {
    step: usize,
    tokens: u64,
    rng: [u64; 4],
    interval_loss_sum: f64,
    interval_steps: usize,
    elapsed_s: f64,
    /// (tokens, mean training loss) every `curve_every` steps, for loss.svg.
    #[serde(default)]
    train_curve: Vec<(u64, f64)>,
    #[serde(default)]
    curve_sum: f64,
    data_fingerprint: String,
    config: TrainConfig,
}

pub enum Event<'a> {
    Step {
        step: usize,
        steps: usize,
        loss: f64,
        lr: f32,
        tokens_per_sec: f64,
    },
    EvalStart {
        step: usize,
    },
    Eval(&'a Metrics),
    Sample {
        step: usize,
        text: &'a str,
    },
    Saved {
        step: usize,
    },
    Stopped {
        step: usize,
        reason: &'a str,
    },
}

/// What a run trains on: a corpus (random windows of a token sequence), or fine-tuning
/// examples packed into windows (visited in a shuffled order each epoch).
#[derive(Clone, Copy)]
pub enum Data<'a> {
    Corpus(&'a Split),
    Examples { train: &'a Packed, val: &'a Packed },
}

impl Data<'_> {
    fn fingerprint(&self) -> String {
        match self {
            Data::Corpus(d) => format!("{}+{}", d.train.fingerprint(), d.val.fingerprint()),
            Data::Examples { train, val } => {
                format!("{}+{}", train.fingerprint(), val.fingerprint())
            }
        }
    }
}

/// A run's LoRA adapters: they alone train, and they are what the run saves.
pub struct Adapters {
    pub lora: Lora,
    acts: LoraActs,
    /// `base_model_name_or_path` of the saved adapter.
    pub base: String,
}

impl Adapters {
    pub fn new(lora: Lora, base: String) -> Self {
        Adapters {
            acts: LoraActs::new(&lora, 0),
            lora,
            base,
        }
    }
}

/// How many numbers train (and have gradients and AdamW moments): every parameter, or the
/// adapters alone.
fn trained_len(model: &Model, lora: Option<&Adapters>) -> usize {
    lora.map_or(model.num_params(), |l| l.lora.params.len())
}

/// What the trainer needs of a tokenizer.
pub struct TokenizerInfo<'a> {
    pub json: String,
    pub token_bytes: Vec<u32>,
    pub decode: &'a dyn Fn(&[u32]) -> String,
    /// Where samples start (a newline for text; a held-out prompt for fine-tuning).
    pub sample_prompt: Vec<u32>,
    /// Ids that end a sample (none: samples run to their length).
    pub sample_stop: Vec<u32>,
    /// tokenizer_config.json written beside the weights (None: a plain one).
    pub config_json: Option<String>,
}

pub struct Trainer<'a> {
    pub model: Model,
    pub opt: AdamW,
    pub config: TrainConfig,
    state: State,
    grads: Vec<f32>,
    acts: Activations,
    ids: Vec<u32>,
    targets: Vec<u32>,
    starts: Vec<u32>,
    /// The epoch whose window order `order` holds (packed examples).
    order: Option<(u64, Vec<usize>)>,
    /// LoRA: the adapters that train (the model stays frozen), their buffers, and the base
    /// model's name for adapter_config.json.
    lora: Option<Adapters>,
    data: Data<'a>,
    out: PathBuf,
    tok: TokenizerInfo<'a>,
    /// The ranks of a data-parallel run (one process by default) and the step's exchange.
    dp: DataParallel,
    /// Check after every step that every rank holds the same parameters (a hash of their
    /// bits, gathered); a difference stops the run with an error.
    pub verify_ranks: bool,
}

impl<'a> Trainer<'a> {
    /// A new run: `model` holds the initial parameters (fresh or from `--init`).
    pub fn new(
        model: Model,
        config: TrainConfig,
        data: Data<'a>,
        out: &Path,
        tok: TokenizerInfo<'a>,
        lora: Option<Adapters>,
    ) -> Result<Self> {
        config.validate()?;
        let state = State {
            step: 0,
            tokens: 0,
            rng: Rng::new(config.seed).state(),
            interval_loss_sum: 0.0,
            interval_steps: 0,
            elapsed_s: 0.0,
            train_curve: Vec::new(),
            curve_sum: 0.0,
            data_fingerprint: data.fingerprint(),
            config: config.clone(),
        };
        Self::build(model, config, (state, None), (data, out), tok, lora)
    }

    /// Continues the run saved in `out`; `model` gives the architecture (its parameters are
    /// replaced by the saved ones), or with LoRA, the frozen base (the adapters' are).
    pub fn resume(
        model: Model,
        data: Data<'a>,
        out: &Path,
        tok: TokenizerInfo<'a>,
        lora: Option<Adapters>,
    ) -> Result<Self> {
        let saved = checkpoint::load(out, trained_len(&model, lora.as_ref()))?;
        let state: State = serde_json::from_str(&saved.state_json).map_err(|e| {
            Error::format(
                out.join(checkpoint::TRAINING_STATE_FILE),
                format!("bad trainer state: {e}"),
            )
        })?;
        if state.data_fingerprint != data.fingerprint() {
            return Err(Error::Input(
                "the training data differ from the data this run started with; resume with the same corpus".into(),
            ));
        }
        let (mut model, mut lora) = (model, lora);
        match &mut lora {
            Some(l) => l.lora.params = saved.params,
            None => *model.params_mut().1 = saved.params,
        }
        let config = state.config.clone();
        let opt_state = (saved.exp_avg, saved.exp_avg_sq);
        Self::build(
            model,
            config,
            (state, Some(opt_state)),
            (data, out),
            tok,
            lora,
        )
    }

    /// `start`: the trainer state, and AdamW's moments when resuming.
    fn build(
        model: Model,
        config: TrainConfig,
        start: (State, Option<Moments>),
        (data, out): (Data<'a>, &Path),
        tok: TokenizerInfo<'a>,
        lora: Option<Adapters>,
    ) -> Result<Self> {
        let (state, moments) = start;
        let mut model = model;
        if lora.is_none() {
            // full training needs every weight in the f32 buffer; LoRA's frozen base may
            // stay quantized or memory-mapped (its rows converted a block at a time)
            model.materialize();
        }
        if config.seq_len > model.context() {
            return Err(Error::Input(format!(
                "context {} is longer than the model's {} positions",
                config.seq_len,
                model.context()
            )));
        }
        match data {
            Data::Corpus(d) if d.train.len() <= config.seq_len => {
                return Err(Error::Input(format!(
                    "the training split ({} tokens) is shorter than the context ({})",
                    d.train.len(),
                    config.seq_len
                )));
            }
            Data::Examples { train, val }
                if train.is_empty()
                    || train.t != config.seq_len
                    || (!val.is_empty() && val.t != config.seq_len) =>
            {
                return Err(Error::Input(format!(
                    "no training windows of {} tokens",
                    config.seq_len
                )));
            }
            _ => {}
        }
        // what trains: every parameter, or the adapters alone
        let trained = trained_len(&model, lora.as_ref());
        let mut opt = AdamW::new(
            trained,
            config.beta1,
            config.beta2,
            1e-8,
            config.weight_decay,
        );
        if let Some(l) = &lora {
            opt.lr_factors = l.lora.lr_factors();
        }
        if let Some((m, v)) = moments {
            opt.m = m;
            opt.v = v;
            opt.t = state.step as u64;
        }
        let n = config.batch_size * config.seq_len;
        let mut lora = lora;
        if let Some(l) = &mut lora {
            l.acts = LoraActs::new(&l.lora, n);
        }
        Ok(Trainer {
            dp: DataParallel::single(trained),
            verify_ranks: false,
            grads: vec![0.0; trained],
            lora,
            acts: model.new_acts(config.batch_size, config.seq_len),
            ids: vec![0; n],
            targets: vec![0; n],
            starts: vec![0; n],
            order: None,
            model,
            opt,
            config,
            state,
            data,
            out: out.to_path_buf(),
            tok,
        })
    }

    /// Makes this trainer one rank of a data-parallel run over `comm`: it trains on its
    /// share of each global batch's rows, the gradients are summed over ranks, and with
    /// `zero` (ZeRO-1) it keeps AdamW's moments of its shard of the parameters alone. Every
    /// rank must call this, with trainers built the same way (rank 0's parameters are
    /// broadcast, so every rank starts from the same ones).
    pub fn distribute(mut self, comm: std::rc::Rc<dyn Comm>, zero: bool) -> Result<Self> {
        let trained = trained_len(&self.model, self.lora.as_ref());
        dist::check_split(self.config.batch_size, trained, comm.size())?;
        self.dp = DataParallel::new(comm, trained, zero);
        if self.dp.size() == 1 {
            return Ok(self);
        }
        let params = match &mut self.lora {
            Some(l) => &mut l.lora.params,
            None => self.model.params_mut().1,
        };
        self.dp.comm.broadcast(params);
        let own = self.dp.moment_range();
        self.opt.m = self.opt.m[own.clone()].to_vec();
        self.opt.v = self.opt.v[own].to_vec();
        self.grads = vec![0.0; self.dp.grad_len()];
        let (rows, t) = (self.rows(), self.config.seq_len);
        let n = rows.len() * t;
        self.acts = self.model.new_acts(rows.len(), t);
        self.ids = vec![0; n];
        self.targets = vec![0; n];
        self.starts = vec![0; n];
        if let Some(l) = &mut self.lora {
            l.acts = LoraActs::new(&l.lora, n);
            l.acts.first_row = rows.start * t;
        }
        Ok(self)
    }

    /// This rank (0 in a one-process run).
    pub fn rank(&self) -> usize {
        self.dp.rank()
    }

    /// Ranks of the run.
    pub fn ranks(&self) -> usize {
        self.dp.size()
    }

    /// What carries a data-parallel run's exchange.
    pub fn describe_ranks(&self) -> String {
        self.dp.comm.describe()
    }

    /// Bytes of AdamW's moments this rank holds.
    pub fn optimizer_bytes(&self) -> usize {
        (self.opt.m.len() + self.opt.v.len()) * 4
    }

    /// Whether AdamW's moments are sharded over the ranks (ZeRO-1).
    pub fn zero(&self) -> bool {
        self.dp.zero
    }

    /// The rows of each global batch this rank trains on.
    fn rows(&self) -> std::ops::Range<usize> {
        dist::rows(self.config.batch_size, self.dp.rank(), self.dp.size())
    }

    pub fn step(&self) -> usize {
        self.state.step
    }

    pub fn schedule(&self) -> Schedule {
        Schedule {
            max_lr: self.config.lr,
            min_lr: self.config.min_lr,
            warmup: self.config.warmup_steps,
            total: self.config.steps,
        }
    }

    /// Mean loss (nats per token) and bits per byte over the whole validation split.
    pub fn evaluate(&mut self) -> Result<(f64, f64)> {
        let split = match self.data {
            Data::Corpus(split) => split,
            Data::Examples { val, .. } => return self.evaluate_packed(val),
        };
        let (b, t) = (self.rows().len(), self.config.seq_len);
        let windows = eval_windows(&split.val, t);
        if windows == 0 {
            return Ok((f64::NAN, f64::NAN));
        }
        // batches of this rank's row count, dealt round-robin over the ranks
        let (mut sum, mut count, mut bytes) = (0.0, 0usize, 0u64);
        let (rank, ranks) = (self.dp.rank(), self.dp.size());
        for (i, first) in (0..windows).step_by(b).enumerate() {
            if i % ranks != rank {
                continue;
            }
            eval_batch(&split.val, t, first, b, &mut self.ids, &mut self.targets);
            self.forward(false)?;
            let (s, c) = self.model.loss(&mut self.acts, &self.targets);
            sum += s;
            count += c;
            bytes += self.target_bytes();
        }
        Ok(self.mean_over_ranks(sum, count, bytes))
    }

    /// (mean loss, bits per byte) from every rank's (loss sum, positions, bytes).
    fn mean_over_ranks(&self, sum: f64, count: usize, bytes: u64) -> (f64, f64) {
        let mut x = [sum, count as f64, bytes as f64];
        self.dp.sum(&mut x);
        let [sum, count, bytes] = x;
        let loss = sum / count.max(1.0);
        (loss, sum / std::f64::consts::LN_2 / bytes.max(1.0))
    }

    /// UTF-8 bytes of the counted targets of the current batch.
    fn target_bytes(&self) -> u64 {
        self.targets
            .iter()
            .filter(|&&x| x != IGNORE)
            .map(|&x| *self.tok.token_bytes.get(x as usize).unwrap_or(&1) as u64)
            .sum()
    }

    /// Mean loss and bits per byte over every learned token of the validation windows (a
    /// last, partial batch is filled with rows that count nothing).
    fn evaluate_packed(&mut self, val: &Packed) -> Result<(f64, f64)> {
        if val.is_empty() {
            return Ok((f64::NAN, f64::NAN));
        }
        let (b, t) = (self.rows().len(), self.config.seq_len);
        let (mut sum, mut count, mut bytes) = (0.0, 0usize, 0u64);
        let (rank, ranks) = (self.dp.rank(), self.dp.size());
        for (i, first) in (0..val.len()).step_by(b).enumerate() {
            if i % ranks != rank {
                continue;
            }
            for r in 0..b {
                let (ids, targets, starts) = val.window((first + r).min(val.len() - 1));
                let rows = r * t..(r + 1) * t;
                self.ids[rows.clone()].copy_from_slice(ids);
                self.starts[rows.clone()].copy_from_slice(starts);
                if first + r < val.len() {
                    self.targets[rows].copy_from_slice(targets);
                } else {
                    self.targets[rows].fill(IGNORE);
                }
            }
            self.forward(true)?;
            let (s, c) = self.model.loss(&mut self.acts, &self.targets);
            sum += s;
            count += c;
            bytes += self.target_bytes();
        }
        Ok(self.mean_over_ranks(sum, count, bytes))
    }

    /// Fills the batch with micro-batch `micro` of the current step: random windows of the
    /// corpus, or the next windows of the epoch's order of packed examples.
    fn fill_batch(&mut self, rng: &mut Rng, micro: usize) -> Result<()> {
        let (b, t) = (self.config.batch_size, self.config.seq_len);
        let rows = self.rows();
        match self.data {
            Data::Corpus(split) => {
                let (ids, targets) = (&mut self.ids, &mut self.targets);
                sample_rows(rng, &split.train, (b, rows), t, ids, targets);
                self.forward(false)
            }
            Data::Examples { train, .. } => {
                let n = train.len();
                let per_step = (b * self.config.grad_accum) as u64;
                let first = self.state.step as u64 * per_step + (micro * b) as u64;
                for (r, global_row) in rows.enumerate() {
                    let g = first + global_row as u64;
                    let epoch = g / n as u64;
                    if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                        self.order = Some((epoch, epoch_order(n, self.config.seed, epoch)));
                    }
                    let w = self.order.as_ref().expect("set").1[(g % n as u64) as usize];
                    let (ids, targets, starts) = train.window(w);
                    let span = r * t..(r + 1) * t;
                    self.ids[span.clone()].copy_from_slice(ids);
                    self.targets[span.clone()].copy_from_slice(targets);
                    self.starts[span].copy_from_slice(starts);
                }
                self.forward(true)
            }
        }
    }

    /// The forward pass over the batch in `ids` (packed by `starts` when `packed`), through
    /// the adapters when training LoRA. Packed examples learn only some rows (a prompt is
    /// context): the head computes the logits of those rows alone.
    fn forward(&mut self, packed: bool) -> Result<()> {
        let (m, a, ids) = (&self.model, &mut self.acts, &self.ids);
        if packed {
            a.logits_where_counted(&self.targets);
        } else {
            a.logits_everywhere();
        }
        match (&mut self.lora, packed) {
            (Some(l), _) => {
                let starts = packed.then_some(&self.starts[..]);
                m.forward_lora(a, ids, starts, (&l.lora, &mut l.acts))
            }
            (None, true) => m.forward_packed(a, ids, &self.starts),
            (None, false) => m.forward(a, ids),
        }
    }

    /// The backward pass of the last forward, adding into `grads`; the loss is the mean over
    /// `over` positions (the global batch's, when it is split over ranks) or this batch's.
    fn backward(&mut self, grad_scale: f32, over: Option<usize>) -> (f64, usize) {
        let mut batch = Batch::new(&self.ids, &self.targets, grad_scale);
        if let Some(n) = over {
            batch = batch.over(n);
        }
        let grads = &mut self.grads[..self.dp.shards.total];
        match &mut self.lora {
            Some(l) => {
                self.model
                    .backward_lora(&mut self.acts, (&l.lora, &mut l.acts), grads, batch)
            }
            None => self.model.backward(&mut self.acts, grads, batch),
        }
    }

    /// Positions the loss counts in the current global batch (None with one rank: the
    /// backward pass counts its own).
    fn global_count(&self) -> Option<usize> {
        if self.dp.size() == 1 {
            return None;
        }
        let mine = self.targets.iter().filter(|&&x| x != IGNORE).count();
        let mut x = [mine as f64];
        self.dp.sum(&mut x);
        Some(x[0] as usize)
    }

    fn metrics_path(&self) -> PathBuf {
        self.out.join("metrics.jsonl")
    }

    /// Keeps the metrics lines of steps up to the current one (a resumed run rewrites the rest).
    fn trim_metrics(&self) -> Result<Vec<Metrics>> {
        let path = self.metrics_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let kept: Vec<Metrics> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Metrics>(l).ok())
            .filter(|m| m.step <= self.state.step)
            .collect();
        let body: String = kept
            .iter()
            .map(|m| serde_json::to_string(m).expect("serializes") + "\n")
            .collect();
        write_text(&path, &body)?;
        Ok(kept)
    }

    fn append_metrics(&self, m: &Metrics) -> Result<()> {
        let path = self.metrics_path();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let line = serde_json::to_string(m).expect("serializes") + "\n";
        f.write_all(line.as_bytes())
            .and_then(|_| f.sync_data())
            .map_err(|e| Error::io(&path, e))
    }

    /// Writes the model folder and the training state.
    /// Every rank calls it (a ZeRO-1 run gathers the moments); rank 0 alone writes.
    pub fn save(&mut self, elapsed_s: f64) -> Result<()> {
        self.state.elapsed_s = elapsed_s;
        let gathered = if self.dp.zero {
            let m = self.dp.gather_moments(&self.opt.m);
            let v = self.dp.gather_moments(&self.opt.v);
            m.zip(v)
        } else {
            None
        };
        if self.dp.rank() != 0 {
            return Ok(());
        }
        let (m, v) = match &gathered {
            Some((m, v)) => (&m[..], &v[..]),
            None => (&self.opt.m[..], &self.opt.v[..]),
        };
        let out = &self.out;
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        write_text(&out.join("tokenizer.json"), &self.tok.json)?;
        let plain = "{\n  \"tokenizer_class\": \"PreTrainedTokenizerFast\",\n  \"clean_up_tokenization_spaces\": false\n}\n";
        write_text(
            &out.join("tokenizer_config.json"),
            self.tok.config_json.as_deref().unwrap_or(plain),
        )?;
        let json = serde_json::to_string(&self.state).expect("state serializes");
        if let Some(l) = &self.lora {
            // the adapter (PEFT's format) is the run's model; the base stays where it is
            crate::io::peft::save(&l.lora, out, &l.base)?;
            return checkpoint::save(out, &l.lora.params, m, v, &json);
        }
        let mut meta = BTreeMap::new();
        meta.insert("quill_step".to_string(), self.state.step.to_string());
        crate::io::hf::save(out, &self.model, &meta)?;
        checkpoint::save(out, self.model.params(), m, v, &json)
    }

    fn write_plot(&self) -> Result<()> {
        let text = std::fs::read_to_string(self.metrics_path()).unwrap_or_default();
        let ms: Vec<Metrics> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let train: Vec<(f64, f64)> = self
            .state
            .train_curve
            .iter()
            .map(|&(t, l)| (t as f64, l))
            .collect();
        let val: Vec<(f64, f64)> = ms.iter().map(|m| (m.tokens as f64, m.val_loss)).collect();
        let title = format!("quill: {}", self.model.describe());
        write_text(&self.out.join("loss.svg"), &loss_svg(&train, &val, &title))
    }

    /// Sample text from the current model (seeded by the step, so runs reproduce).
    /// `salt` varies the seed for samples taken at the same step.
    pub fn sample_text(&mut self, n: usize, temperature: f32, salt: u64) -> Result<String> {
        if let (Some(l), true) = (&self.lora, self.model.is_mapped()) {
            // a base that stays quantized or memory-mapped: the adapters run beside it
            self.model.adapters = Some(std::sync::Arc::new(l.lora.clone()));
            let text = self.sample_plain(n, temperature, salt);
            self.model.adapters = None;
            return text;
        }
        // an f32 base: sample from the merged weights, then put the frozen ones back as they
        // were (bit for bit: training continues from them)
        let kept: Vec<(crate::model::View, Vec<f32>)> = match &self.lora {
            Some(l) => {
                let kept = l
                    .lora
                    .touched(&self.model)
                    .into_iter()
                    .map(|v| (v, v.of(&self.model.params).to_vec()))
                    .collect();
                l.lora.merge_into(&mut self.model)?;
                kept
            }
            None => Vec::new(),
        };
        let text = self.sample_plain(n, temperature, salt);
        for (v, w) in kept {
            v.of_mut(&mut self.model.params).copy_from_slice(&w);
        }
        text
    }

    fn sample_plain(&self, n: usize, temperature: f32, salt: u64) -> Result<String> {
        let params = SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            seed: self.config.seed ^ (self.state.step as u64).wrapping_mul(0x9E37_79B9) ^ salt,
            ..Default::default()
        };
        let mut sampler = Sampler::new(params)?;
        let ids = generate(
            &self.model,
            &self.tok.sample_prompt,
            Stop {
                max_new: n,
                eos: &self.tok.sample_stop,
            },
            &mut sampler,
            |_| {},
            |_| Ok(true),
        )?;
        Ok((self.tok.decode)(&ids))
    }

    /// Trains until the configured number of steps, a stop request, the time limit or
    /// `stop_after`; saves at every evaluation and when it stops.
    pub fn run(
        &mut self,
        opts: &RunOptions,
        stop: &AtomicBool,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<()> {
        let start = Instant::now();
        let elapsed_base = self.state.elapsed_s;
        let elapsed = |s: &Instant| elapsed_base + s.elapsed().as_secs_f64();
        let lead = self.dp.rank() == 0;
        if lead && self.state.step == 0 {
            let _ = std::fs::remove_file(self.metrics_path());
        }
        if lead {
            self.trim_metrics()?;
        }
        if self.state.step == 0 {
            self.save(0.0)?;
        }
        let schedule = self.schedule();
        let cfg = self.config.clone();
        let (b, t, accum) = (cfg.batch_size, cfg.seq_len, cfg.grad_accum);
        let mut rng = Rng::from_state(self.state.rng);
        let mut interval_time = 0.0f64;
        let mut interval_tokens = 0u64;
        let mut steps_this_run = 0;
        while self.state.step < cfg.steps {
            // every rank stops at the same step: an interrupt on any rank, rank 0's clock
            let mut flags = [
                stop.load(Ordering::Relaxed) as u8 as f64,
                (lead
                    && opts
                        .time_limit
                        .is_some_and(|l| start.elapsed().as_secs_f64() >= l)) as u8
                    as f64,
            ];
            self.dp.sum(&mut flags);
            let reason = if flags[0] > 0.0 {
                Some("interrupted")
            } else if flags[1] > 0.0 {
                Some("time limit reached")
            } else if opts.stop_after.is_some_and(|n| steps_this_run >= n) {
                Some("--stop-after reached")
            } else {
                None
            };
            if let Some(reason) = reason {
                self.state.rng = rng.state();
                self.save(elapsed(&start))?;
                on_event(Event::Stopped {
                    step: self.state.step,
                    reason,
                });
                return Ok(());
            }
            let t0 = Instant::now();
            let lr = schedule.lr(self.state.step);
            self.grads.fill(0.0);
            let mut step_loss = 0.0;
            for micro in 0..accum {
                if let Some(l) = &mut self.lora {
                    // dropout masks, drawn again identically when the run resumes
                    l.acts.seed = cfg.seed ^ ((self.state.step as u64) << 16) ^ micro as u64;
                }
                self.fill_batch(&mut rng, micro)?;
                let over = self.global_count();
                let (sum, count) = self.backward(1.0 / accum as f32, over);
                step_loss += sum / over.unwrap_or(count).max(1) as f64 / accum as f64;
            }
            let mut summed = [step_loss];
            self.dp.sum(&mut summed);
            let step_loss = summed[0];
            let (layout, params) = match &mut self.lora {
                Some(l) => (&l.lora.layout, &mut l.lora.params),
                None => self.model.params_mut(),
            };
            let clip = (lr, cfg.grad_clip);
            let last_norm = self
                .dp
                .step(&mut self.opt, layout, params, &mut self.grads, clip);
            if self.verify_ranks && !self.dp.ranks_agree(params) {
                return Err(Error::Input(format!(
                    "after step {} the ranks hold different parameters",
                    self.state.step + 1
                )));
            }
            self.state.step += 1;
            steps_this_run += 1;
            self.state.tokens += (b * t * accum) as u64;
            self.state.interval_loss_sum += step_loss;
            self.state.interval_steps += 1;
            let curve_every = (cfg.steps / 100).max(1);
            self.state.curve_sum += step_loss;
            if self.state.step.is_multiple_of(curve_every) {
                let point = (self.state.tokens, self.state.curve_sum / curve_every as f64);
                self.state.train_curve.push(point);
                self.state.curve_sum = 0.0;
            }
            interval_time += t0.elapsed().as_secs_f64();
            interval_tokens += (b * t * accum) as u64;
            let tps = interval_tokens as f64 / interval_time.max(1e-9);
            on_event(Event::Step {
                step: self.state.step,
                steps: cfg.steps,
                loss: step_loss,
                lr,
                tokens_per_sec: tps,
            });
            if self.state.step.is_multiple_of(cfg.eval_interval) || self.state.step == cfg.steps {
                on_event(Event::EvalStart {
                    step: self.state.step,
                });
                let (val_loss, val_bpb) = self.evaluate()?;
                let m = Metrics {
                    step: self.state.step,
                    tokens: self.state.tokens,
                    train_loss: self.state.interval_loss_sum
                        / self.state.interval_steps.max(1) as f64,
                    val_loss,
                    val_bpb,
                    lr,
                    grad_norm: last_norm,
                    tokens_per_sec: tps,
                    elapsed_s: elapsed(&start),
                };
                self.state.interval_loss_sum = 0.0;
                self.state.interval_steps = 0;
                interval_time = 0.0;
                interval_tokens = 0;
                if lead {
                    self.append_metrics(&m)?;
                }
                on_event(Event::Eval(&m));
                if lead && cfg.sample_tokens > 0 {
                    let text = self.sample_text(cfg.sample_tokens, 0.8, 0)?;
                    on_event(Event::Sample {
                        step: self.state.step,
                        text: &text,
                    });
                }
                self.state.rng = rng.state();
                self.save(elapsed(&start))?;
                if lead {
                    self.write_plot()?;
                }
                on_event(Event::Saved {
                    step: self.state.step,
                });
            }
        }
        self.state.rng = rng.state();
        Ok(())
    }
}
