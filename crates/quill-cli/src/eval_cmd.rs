//! `quill eval`: how well a model does a task, in the task's own scores.
//! - `translate`: the model translates held-out sentences (greedy or by beam search,
//!   through its chat template or a plain-text template); BLEU and chrF as sacreBLEU computes them, and a few examples.
//! - `qa`: the model answers held-out questions; exact match and token F1 as SQuAD's
//!   evaluation defines them.
//! - `score`: BLEU and chrF of a file of hypotheses against a file of references.

use anyhow::{bail, Context, Result};
use quill::chat::Message;
use quill::eval::{corpus_bleu, corpus_chrf};
use quill::sample::{beam_search, generate, BeamSearch, Sampler, SamplingParams, Stop};
use quill::tokenizer::StreamDecoder;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum EvalCommand {
    /// Translate held-out sentences with a model and score them (BLEU, chrF).
    Translate(TranslateArgs),
    /// Answer held-out questions with a model and score the answers (exact match, F1).
    Qa(QaArgs),
    /// Score hypotheses against references, one per line (BLEU and chrF; exact match and F1).
    Score(ScoreArgs),
}

#[derive(clap::Args)]
pub struct TranslateArgs {
    #[command(flatten)]
    task: TaskArgs,
    /// The request before each source sentence (for .tsv and source/target records).
    #[arg(long, default_value = "Translate to French:")]
    instruction: String,
}

#[derive(clap::Args)]
pub struct QaArgs {
    #[command(flatten)]
    task: TaskArgs,
    /// Words before each question (for .tsv and source/target records).
    #[arg(long, default_value = "")]
    instruction: String,
}

/// What the model is asked and how (shared by the tasks).
#[derive(clap::Args)]
pub struct TaskArgs {
    /// Model folder, GGUF file, or llama2.c checkpoint (with --tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// The tokenizer of a llama2.c checkpoint.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// A LoRA adapter folder (PEFT's format) merged into the model (run beside a quantized base).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Pairs: a .tsv file (source<TAB>reference per line), or .jsonl records
    /// ({"source", "target"}, {"messages": [...]} whose last assistant turn is the
    /// reference, or {"prompt", "completion"}).
    #[arg(long)]
    data: PathBuf,
    /// A system message before each request.
    #[arg(long)]
    system: Option<String>,
    /// Plain text instead of a conversation, for .tsv pairs and source/target records: the
    /// template fine-tuning used (`quill finetune --pair-template`), e.g. 'English:
    /// {source}\nFrench: {target}'; the model continues the text before {target}.
    #[arg(long, conflicts_with_all = ["system", "instruction"])]
    pair_template: Option<String>,
    /// Score only the first N pairs (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 96)]
    max_new_tokens: usize,
    /// Beam search with this many beams (transformers' `num_beams`, length penalty 1)
    /// instead of greedy decoding (1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    beams: u16,
    /// Examples printed (source, reference, model).
    #[arg(long, default_value_t = 5)]
    examples: usize,
    /// Write the model's replies here, one per line.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Hypotheses, one per line.
    #[arg(long)]
    hyps: PathBuf,
    /// References, one per line (as many lines as --hyps).
    #[arg(long)]
    refs: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(c: EvalCommand) -> Result<()> {
    match c {
        EvalCommand::Translate(a) => translate(a),
        EvalCommand::Qa(a) => qa(a),
        EvalCommand::Score(a) => score(a),
    }
}

/// One pair: what the model is asked (messages, or raw text), the source shown in
/// examples, and the reference.
struct Pair {
    request: Request,
    source: String,
    reference: String,
}

enum Request {
    Chat(Vec<Message>),
    Text(String),
}

fn read_pairs(a: &TaskArgs, instruction: &str) -> Result<Vec<Pair>> {
    let path = &a.data;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let template = (a.pair_template.as_deref())
        .map(quill::data::sft::PairTemplate::parse)
        .transpose()?;
    let ask = |source: &str| {
        if let Some(t) = &template {
            return Request::Text(t.prompt(source));
        }
        let mut m = Vec::new();
        if let Some(s) = &a.system {
            m.push(Message::new("system", s));
        }
        let user = if instruction.is_empty() {
            source.to_string()
        } else {
            format!("{instruction} {source}")
        };
        m.push(Message::new("user", &user));
        Request::Chat(m)
    };
    let jsonl = path
        .extension()
        .is_some_and(|e| e == "jsonl" || e == "json");
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: &str| anyhow::anyhow!("{}: line {}: {msg}", path.display(), i + 1);
        if !jsonl {
            let Some((src, reference)) = line.split_once('\t') else {
                bail!(at("expected source<TAB>reference"));
            };
            let reference = reference.split('\t').next().unwrap_or("").trim();
            pairs.push(Pair {
                request: ask(src.trim()),
                source: src.trim().into(),
                reference: reference.into(),
            });
            continue;
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| at(&format!("not valid JSON: {e}")))?;
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        let pair = if let (Some(src), Some(tgt)) = (s("source"), s("target")) {
            Pair {
                request: ask(src),
                source: src.into(),
                reference: tgt.into(),
            }
        } else if let (Some(p), Some(c)) = (s("prompt"), s("completion")) {
            Pair {
                request: Request::Text(p.into()),
                source: p.into(),
                reference: c.trim().into(),
            }
        } else if let Some(list) = v.get("messages").and_then(Value::as_array) {
            let mut msgs = Vec::new();
            for m in list {
                let (Some(role), Some(content)) = (
                    m.get("role").and_then(Value::as_str),
                    m.get("content").and_then(Value::as_str),
                ) else {
                    bail!(at("a message needs \"role\" and \"content\" strings"));
                };
                msgs.push(Message::new(role, content));
            }
            let Some(k) = msgs.iter().rposition(|m| m.role == "assistant") else {
                bail!(at("no assistant message to compare with"));
            };
            let reference = msgs[k].content.clone();
            msgs.truncate(k);
            Pair {
                source: msgs.last().map(|m| m.content.clone()).unwrap_or_default(),
                request: Request::Chat(msgs),
                reference,
            }
        } else {
            bail!(at("expected {\"source\", \"target\"}, {\"prompt\", \"completion\"} or {\"messages\": [...]}"));
        };
        pairs.push(pair);
    }
    if a.limit > 0 {
        pairs.truncate(a.limit);
    }
    if pairs.is_empty() {
        bail!("{}: no sentence pairs", path.display());
    }
    Ok(pairs)
}

/// The model's replies (each its first line, trimmed) to every pair's request, greedy or by
/// beam search.
fn replies(a: &TaskArgs, pairs: &[Pair]) -> Result<(Vec<String>, f64)> {
    let o = quill::io::open_adapted(&a.model, a.tokenizer.as_deref(), a.adapter.as_deref())?;
    let mut hyps = Vec::with_capacity(pairs.len());
    let started = std::time::Instant::now();
    for (i, p) in pairs.iter().enumerate() {
        let text = match &p.request {
            Request::Chat(m) => match &o.template {
                Some(t) => t.render(m, true)?,
                None => bail!(
                    "{}: this model has no chat template; give pairs as {{\"prompt\", \"completion\"}} records",
                    a.model.display()
                ),
            },
            Request::Text(t) => t.clone(),
        };
        let ids = match &p.request {
            Request::Chat(_) => o.tok.encode(&text)?,
            Request::Text(_) => o.tok.encode_with_special(&text)?,
        };
        let mut out = if a.beams > 1 {
            let b = BeamSearch {
                beams: a.beams as usize,
                max_new: a.max_new_tokens,
                length_penalty: 1.0,
            };
            beam_search(&o.model, &ids, &o.eos, b)?
        } else {
            let mut sampler = Sampler::new(SamplingParams {
                temperature: 0.0,
                ..Default::default()
            })?;
            let stop = Stop {
                max_new: a.max_new_tokens,
                eos: &o.eos,
            };
            // greedy decoding is causal: once the reply's first line is whole, what follows
            // cannot change it, so the reply stops there
            let (mut stream, mut text) = (StreamDecoder::new(), String::new());
            generate(
                &o.model,
                &ids,
                stop,
                &mut sampler,
                |_| {},
                |id| {
                    text += &stream.push(&o.tok, id)?;
                    Ok(!text.trim_start().contains('\n'))
                },
            )?
        };
        out.retain(|t| !o.eos.contains(t));
        let hyp = o.tok.decode(&out)?;
        // the translation is the reply's first line
        hyps.push(hyp.trim().lines().next().unwrap_or("").trim().to_string());
        if !a.json && (i + 1) % 25 == 0 {
            eprintln!("{}/{}", i + 1, pairs.len());
        }
    }
    if let Some(path) = &a.out {
        let body: String = hyps.iter().map(|h| format!("{h}\n")).collect();
        quill::io::atomic::write_text(path, &body)?;
    }
    Ok((hyps, started.elapsed().as_secs_f64()))
}

fn translate(t: TranslateArgs) -> Result<()> {
    let a = &t.task;
    let pairs = read_pairs(a, &t.instruction)?;
    let (hyps, secs) = replies(a, &pairs)?;
    let refs: Vec<String> = pairs.iter().map(|p| p.reference.clone()).collect();
    let scores = translation_scores(&hyps, &refs);
    if a.json {
        let mut v = serde_json::json!({
            "sentences": pairs.len(),
            "seconds": secs,
            "examples": examples_json(&pairs, &hyps, a.examples, "source"),
        });
        v.as_object_mut().expect("object").extend(scores);
        println!("{v}");
        return Ok(());
    }
    print_examples(&pairs, &hyps, a.examples, "source:   ");
    print_translation_scores(&scores, pairs.len());
    println!(
        "({:.0} s, {:.2} s a sentence)",
        secs,
        secs / pairs.len() as f64
    );
    Ok(())
}

fn qa(q: QaArgs) -> Result<()> {
    let a = &q.task;
    let pairs = read_pairs(a, &q.instruction)?;
    let (hyps, secs) = replies(a, &pairs)?;
    let refs: Vec<String> = pairs.iter().map(|p| p.reference.clone()).collect();
    let (em, f1) = squad_scores(&hyps, &refs);
    if a.json {
        let v = serde_json::json!({
            "questions": pairs.len(),
            "exact_match": em,
            "f1": f1,
            "seconds": secs,
            "examples": examples_json(&pairs, &hyps, a.examples, "question"),
        });
        println!("{v}");
        return Ok(());
    }
    print_examples(&pairs, &hyps, a.examples, "question: ");
    println!(
        "exact match {em:.1}%  F1 {f1:.1}  on {} questions  ({secs:.0} s)",
        pairs.len()
    );
    Ok(())
}

/// The first `n` pairs beside the model's replies, as JSON (`what` names the source).
fn examples_json(pairs: &[Pair], hyps: &[String], n: usize, what: &str) -> Vec<Value> {
    pairs
        .iter()
        .zip(hyps)
        .take(n)
        .map(|(p, h)| serde_json::json!({what: p.source, "reference": p.reference, "output": h}))
        .collect()
}

/// The first `n` pairs beside the model's replies, as text (`label` names the source).
fn print_examples(pairs: &[Pair], hyps: &[String], n: usize, label: &str) {
    for (p, h) in pairs.iter().zip(hyps).take(n) {
        println!(
            "{label} {}\nreference: {}\nmodel:     {h}\n",
            p.source, p.reference
        );
    }
}

/// Mean exact match and token F1 (percent), as SQuAD's evaluation defines them.
fn squad_scores(hyps: &[String], refs: &[String]) -> (f64, f64) {
    let n = hyps.len().max(1) as f64;
    let (mut em, mut f1) = (0.0, 0.0);
    for (h, r) in hyps.iter().zip(refs) {
        em += quill::eval::exact_match(h, r);
        f1 += quill::eval::token_f1(h, r);
    }
    (100.0 * em / n, 100.0 * f1 / n)
}

/// BLEU (with its parts) and chrF, as the JSON fields both `translate` and `score` print.
fn translation_scores(hyps: &[String], refs: &[String]) -> serde_json::Map<String, Value> {
    let bleu = corpus_bleu(hyps, refs);
    let v = serde_json::json!({
        "bleu": bleu.score,
        "bleu_precisions": bleu.precisions,
        "brevity_penalty": bleu.brevity_penalty,
        "hyp_len": bleu.hyp_len,
        "ref_len": bleu.ref_len,
        "chrf": corpus_chrf(hyps, refs),
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("an object"),
    }
}

fn print_translation_scores(s: &serde_json::Map<String, Value>, n: usize) {
    let f = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
    let p: Vec<f64> = s["bleu_precisions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    println!(
        "BLEU {:.2}  ({:.1}/{:.1}/{:.1}/{:.1}, brevity penalty {:.3}, {} / {} tokens)  chrF {:.2}  on {n} sentences",
        f("bleu"),
        p[0],
        p[1],
        p[2],
        p[3],
        f("brevity_penalty"),
        s["hyp_len"],
        s["ref_len"],
        f("chrf")
    );
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text.lines().map(String::from).collect())
}

fn score(a: ScoreArgs) -> Result<()> {
    let (hyps, refs) = (read_lines(&a.hyps)?, read_lines(&a.refs)?);
    if hyps.len() != refs.len() {
        bail!(
            "{} has {} lines but {} has {}",
            a.hyps.display(),
            hyps.len(),
            a.refs.display(),
            refs.len()
        );
    }
    let scores = translation_scores(&hyps, &refs);
    let (em, f1) = squad_scores(&hyps, &refs);
    if a.json {
        let mut v = serde_json::json!({
            "exact_match": em,
            "f1": f1,
            "sentences": hyps.len(),
        });
        v.as_object_mut().expect("object").extend(scores);
        println!("{v}");
    } else {
        print_translation_scores(&scores, hyps.len());
        println!("exact match {em:.1}%  F1 {f1:.1}");
    }
    Ok(())
}
