//! The `quill` command line: argument parsing, progress bars and printing. No numerics here.

mod eval_cmd;
mod finetune_cmd;
mod train_cmd;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use quill::chat::{ChatTemplate, Message};
use quill::io::hf::GenerationConfig;
use quill::io::Opened;
use quill::sample::{
    beam_search, generate, BeamSearch, GenerateEvent, Sampler, SamplingParams, Stop,
};
use quill::tokenizer::{train_byte_level_bpe, StreamDecoder, Tokenizer};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "quill",
    version,
    about = "Train and run transformer language models on the CPU",
    long_about = "Train and run transformer language models on the CPU.\n\n\
        `quill train` with no arguments trains a character-level GPT-2 on Tiny Shakespeare \
        (embedded in the binary) and writes a Hugging Face model folder to ./out."
)]
struct Cli {
    /// Worker threads for the numerics (default: all cores; under mpirun, the cores shared
    /// by the ranks on this host).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a GPT-2 on a text file (default: Tiny Shakespeare), character level.
    Train(Box<train_cmd::TrainArgs>),
    /// Fine-tune a pretrained model on JSONL records (conversations or prompt/completion
    /// pairs): loss on the responses only, short examples packed into full windows.
    Finetune(Box<finetune_cmd::FinetuneArgs>),
    /// Merge a LoRA adapter into its base model and write a Hugging Face folder.
    Merge(finetune_cmd::MergeArgs),
    /// Measure a model on a task: `translate` (BLEU and chrF), or `score` translations.
    #[command(subcommand)]
    Eval(eval_cmd::EvalCommand),
    /// Write text with a model, sampling one token at a time (streams to stdout).
    Generate(GenerateArgs),
    /// Chat with a model through its own chat template (multi-turn; /reset, /exit).
    Chat(ChatArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).
    Serve(ServeArgs),
    /// Show how a model decides: each prompt token's surprisal, then for each generated token
    /// the softmax distribution, the temperature/top-k/top-p cut and the token drawn.
    Explain(ExplainArgs),
    /// Print the logits of every position for the given token ids, as JSON.
    Logits(LogitsArgs),
    /// Print each token's log-probability under a model, the mean loss and bits per byte.
    Score(ScoreArgs),
    /// Perplexity and bits per byte of a text file (llama-perplexity's chunks: the second half
    /// of each context-long chunk is scored).
    Perplexity(PerplexityArgs),
    /// Write a model (folder, GGUF file or llama2.c checkpoint) as a GGUF file of a chosen
    /// type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_m, q6_k.
    Quantize(QuantizeArgs),
    /// Tokenize text and JSONL corpora into token shards for `quill train --data DIR` (streaming).
    Prepare(PrepareArgs),
    /// Print the token ids of a text as JSON {"ids": [...]}.
    Tokenize(TokenizeArgs),
    /// Print the text of comma-separated token ids.
    Detokenize(DetokenizeArgs),
    /// Measure this machine and quill: `quill bench peak`, `quill bench train --config char`.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Tokenizer tools: `quill tokenizer train` trains a byte-level BPE.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// fp32 matrix-multiply GFLOP/s and memory bandwidth (GB/s: bytes read by a sum, and bytes read + written by a copy).
    Peak {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Median tokens/s of whole training steps (forward, backward, AdamW) after warm-up,
    /// with MFU = (6·N + 12·L·C·T) · tokens/s / measured fp32 peak.
    Train {
        /// nano (65 vocab, 4x4x128, T 64, B 12), char (65, 6x6x384, T 256, B 8),
        /// gpt2-mini (50257, 4x4x256, T 256, B 8) or gpt2-small (GPT-2 124M, T 1024, B 1).
        #[arg(long, default_value = "char")]
        config: String,
        /// Sequences per step (default: the config's).
        #[arg(long)]
        batch: Option<usize>,
        /// Sequence length (default: the config's).
        #[arg(long)]
        seq: Option<usize>,
        /// Timed steps (after 2 warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Matrix operands: f32, or bf16 (mixed precision: bf16 operands, f32 accumulation,
        /// master weights and everything else).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Under mpirun: keep AdamW's moments whole on every rank (no ZeRO-1).
        #[arg(long)]
        no_zero: bool,
    },
    /// Prompt tokens/s, decode tokens/s at batch 1 and the memory bandwidth decoding uses
    /// (weight bytes per token × tokens/s ÷ the read bandwidth: the higher of a measurement
    /// before the model is opened and one after decoding), on random prompt ids.
    Generate {
        /// Model folder (any supported architecture).
        #[arg(long)]
        model: PathBuf,
        /// Prompt tokens.
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        /// Tokens decoded one at a time after the prompt.
        #[arg(long, default_value_t = 128)]
        new: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (GPT-2 style, with <|endoftext|>) and save tokenizer.json.
    Train(TokenizerTrainArgs),
}

#[derive(clap::Args)]
struct TokenizerTrainArgs {
    /// UTF-8 text files to learn the merges from.
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// Vocabulary size: 256 bytes + merges + <|endoftext|>.
    #[arg(long)]
    vocab_size: usize,
    /// Output folder (tokenizer.json is written there).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// Text files, .jsonl files (one {"text": ...} object per line) or folders (searched for .txt and .jsonl).
    #[arg(long, num_args = 1.., required = true)]
    input: Vec<PathBuf>,
    /// `char` (the characters of the input), `gpt2` (built in), or a tokenizer.json / model folder.
    #[arg(long)]
    tokenizer: String,
    /// Output folder: train-NNNNN.bin, val-NNNNN.bin, meta.json, tokenizer.json.
    #[arg(long)]
    out: PathBuf,
    /// Fraction of the input (its last bytes) written to the validation shards.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Token size in the shards: auto (u16 when the vocabulary fits), u16 or u32.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Tokens per shard file.
    #[arg(long, default_value_t = 1 << 28)]
    shard_tokens: u64,
    /// Replace invalid UTF-8 with U+FFFD instead of stopping with an error.
    #[arg(long)]
    lossy: bool,
}

#[derive(clap::Args)]
struct TokenizeArgs {
    /// A tokenizer.json file, a model folder holding one, a GGUF file (its tokenizer inside), or `gpt2` (OpenAI's GPT-2 tokenizer, built in).
    #[arg(long)]
    tokenizer: String,
    /// Text to tokenize.
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    text: Option<String>,
    /// UTF-8 file to tokenize.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Treat special-token strings such as <|endoftext|> as plain text (as OpenAI's encoder does).
    #[arg(long)]
    plain: bool,
}

#[derive(clap::Args)]
struct DetokenizeArgs {
    /// A tokenizer.json file, a model folder holding one, a GGUF file, or `gpt2`.
    #[arg(long)]
    tokenizer: String,
    /// Comma-separated token ids, e.g. 15496,995.
    #[arg(long)]
    ids: String,
}

/// Sampling flags shared by generate and chat. Unset flags take the model's
/// generation_config.json values, then quill's defaults.
#[derive(clap::Args, Clone)]
struct SamplingArgs {
    /// Softmax temperature: below 1 sharper, above 1 flatter; 0 is greedy (always the most
    /// likely token) [default: generation_config.json's, else 0.8; 0 when it sets do_sample false].
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Sample only from the K most likely tokens, 0 for no limit [default: generation_config.json's, else 0].
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling: only from the most likely tokens whose probabilities add up to P, in
    /// (0, 1] [default: generation_config.json's, else 1].
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Min-p: only tokens at least this fraction as likely as the most likely one, in [0, 1]
    /// (0 is off) [default: generation_config.json's, else 0].
    #[arg(long, allow_negative_numbers = true)]
    min_p: Option<f32>,
    /// Subtract this from the logit of every token already generated (OpenAI's presence
    /// penalty, in [-2, 2]).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtract this times the count of each token generated so far from its logit (OpenAI's
    /// frequency penalty, in [-2, 2]).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Divide the logits of tokens already in the text by this (transformers' repetition
    /// penalty; 1 is off) [default: generation_config.json's, else 1].
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Random seed: the same seed, model and settings give the same text.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self, gen: &GenerationConfig) -> SamplingParams {
        let greedy = gen.do_sample == Some(false);
        let sampling = gen.do_sample == Some(true);
        SamplingParams {
            temperature: self.temperature.unwrap_or(if greedy {
                0.0
            } else {
                gen.temperature.unwrap_or(0.8)
            }),
            // transformers' default top-k is 50 when a config asks for sampling without one
            top_k: self.top_k.unwrap_or(match (gen.top_k, sampling) {
                (Some(k), _) => k,
                (None, true) => 50,
                (None, false) => 0,
            }),
            top_p: self.top_p.unwrap_or(gen.top_p.unwrap_or(1.0)),
            repetition_penalty: self
                .repetition_penalty
                .unwrap_or(gen.repetition_penalty.unwrap_or(1.0)),
            min_p: self.min_p.unwrap_or(gen.min_p.unwrap_or(0.0)),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            vocab_limit: 0,
            seed: self.seed,
        }
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model folder (config.json, model.safetensors, tokenizer.json), or a llama2.c checkpoint
    /// file (`.bin`, with --tokenizer naming its tokenizer.bin).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter folder (PEFT's format: adapter_config.json, adapter_model.safetensors)
    /// merged into the model's weights (run beside them, unmerged, when they are quantized).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The tokenizer of a llama2.c checkpoint (llama2.c's tokenizer.bin format).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Text to continue. Longer than the context: only its end is kept (with a warning).
    #[arg(long, default_value = "\n")]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template and print the reply.
    #[arg(long)]
    chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Beam search with this many beams (transformers' `num_beams`, length penalty 1): the
    /// most likely continuation the beams find, printed when the search ends, in place of
    /// sampling.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64),
          conflicts_with_all = ["temperature", "top_k", "top_p", "min_p", "presence_penalty",
                                "frequency_penalty", "repetition_penalty", "seed"])]
    beams: Option<u16>,
    /// Most tokens to generate (fewer if the model writes an end token)
    /// [default: generation_config.json's max_new_tokens, else 500].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// Model folder (config.json, model.safetensors, tokenizer.json), or a llama2.c
    /// checkpoint (.bin, with --tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter folder (PEFT's format: adapter_config.json, adapter_model.safetensors)
    /// merged into the model's weights (run beside them, unmerged, when they are quantized).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The tokenizer of a llama2.c checkpoint (llama2.c's tokenizer.bin format).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Text to explain (and continue).
    #[arg(long)]
    prompt: String,
    /// Candidates shown per generated token.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Tokens to generate and explain.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Also print where attention looks: LAYER:HEAD (0-based), the weights over the prompt.
    #[arg(long)]
    attention: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Model folder (config.json, model.safetensors, tokenizer.json; a chat template for
    /// /v1/chat/completions), or a llama2.c checkpoint (.bin, with --tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter folder (PEFT's format: adapter_config.json, adapter_model.safetensors)
    /// merged into the model's weights (run beside them, unmerged, when they are quantized).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The tokenizer of a llama2.c checkpoint (llama2.c's tokenizer.bin format).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Address to listen on (loopback by default; 0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long)]
    api_key: Option<String>,
    /// Another name this server may be reached by (repeatable). Bound to a loopback address,
    /// it answers only requests for localhost, 127.0.0.1 or [::1] (and these), so that a web
    /// page cannot reach it through a DNS name of its own.
    #[arg(long = "allow-host")]
    allow_host: Vec<String>,
    /// Seconds a client has to send a request's headers; slower or idle connections are closed.
    #[arg(long, default_value_t = quill_server::HEADER_SECONDS)]
    header_timeout: u64,
    /// Seconds a client has to send a request's body (then 408).
    #[arg(long, default_value_t = quill_server::BODY_SECONDS)]
    body_timeout: u64,
    /// Requests that may wait for their turn; beyond it, new requests get 429.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// Requests decoded together (each holds a KV cache); more wait in the queue.
    #[arg(long, default_value_t = quill_server::engine::MAX_ACTIVE)]
    max_active: usize,
}

#[derive(clap::Args)]
struct ChatArgs {
    /// Model folder with a chat template (tokenizer_config.json's chat_template or
    /// chat_template.jinja), or a llama2.c checkpoint (.bin, with --tokenizer; it has no
    /// template, so each line is text the model continues).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter folder (PEFT's format: adapter_config.json, adapter_model.safetensors)
    /// merged into the model's weights (run beside them, unmerged, when they are quantized).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The tokenizer of a llama2.c checkpoint (llama2.c's tokenizer.bin format).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// System message placed before the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply [default: generation_config.json's max_new_tokens, else 512].
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Print each rendered prompt (the exact text the model reads) to stderr as a JSON line.
    #[arg(long)]
    show_prompt: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(clap::Args)]
struct LogitsArgs {
    /// Model folder (config.json, model.safetensors), a GGUF file, or a llama2.c checkpoint (.bin).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter folder (PEFT's format: adapter_config.json, adapter_model.safetensors)
    /// merged into the model's weights (run beside them, unmerged, when they are quantized).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Comma-separated token ids, e.g. 1,2,3.
    #[arg(long)]
    ids: String,
    /// Convert a GGUF file's quantized weights to f32 first (the plain twin of the quantized
    /// kernels, which also quantize the activations, to 16 bits per 32 numbers).
    #[arg(long)]
    dequantize: bool,
}

#[derive(clap::Args)]
struct PerplexityArgs {
    /// Model folder, GGUF file, or llama2.c checkpoint (.bin, with --tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter folder (PEFT's format: adapter_config.json, adapter_model.safetensors)
    /// merged into the model's weights (run beside them, unmerged, when they are quantized).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The tokenizer of a llama2.c checkpoint (llama2.c's tokenizer.bin format).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// UTF-8 text file to measure on.
    #[arg(long)]
    file: PathBuf,
    /// Tokens per chunk [default: 512, or the model's context if shorter].
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Score only the first N chunks (0: all).
    #[arg(long, default_value_t = 0)]
    chunks: usize,
    /// Convert a GGUF file's quantized weights to f32 first (the plain twin).
    #[arg(long)]
    dequantize: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct QuantizeArgs {
    /// Model folder, GGUF file, or llama2.c checkpoint (.bin, with --tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// The tokenizer of a llama2.c checkpoint (llama2.c's tokenizer.bin format).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k_m or q6_k (llama.cpp's names).
    #[arg(long = "type")]
    qtype: String,
    /// The GGUF file to write (replaced atomically).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// Model folder (config.json, model.safetensors, tokenizer.json), or a llama2.c
    /// checkpoint (.bin, with --tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter folder (PEFT's format: adapter_config.json, adapter_model.safetensors)
    /// merged into the model's weights (run beside them, unmerged, when they are quantized).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// The tokenizer of a llama2.c checkpoint (llama2.c's tokenizer.bin format).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Text to score.
    #[arg(long)]
    text: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        // output piped into a reader that has gone (`quill ... | head`): stop quietly, with
        // the status a shell gives a process ended by SIGPIPE
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        eprintln!("error: internal error (a bug in quill, please report it): {msg}{at}");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::{
                DisplayHelp, DisplayHelpOnMissingArgumentOrSubcommand, DisplayVersion,
            };
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // one line: clap's first line names the problem; the usage that follows is in --help
            let text = e.render().to_string();
            eprintln!(
                "{} (see --help)",
                text.lines().next().unwrap_or("error: bad arguments")
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        pool = pool.num_threads(n);
    } else if let Some(local) = quill::train::dist::local_ranks().filter(|&n| n > 1) {
        // ranks an MPI launcher started on this host share its cores
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        pool = pool.num_threads((cores / local).max(1));
    }
    let pool = pool.build().context("setting up the thread pool")?;
    // Run the command on a pool thread: parallel kernels then start from inside the pool
    // instead of waking it from outside and blocking on every call (measured: ~10% of a
    // small model's training step went to those context switches).
    if let Command::Serve(a) = cli.command {
        // the server runs its own engine thread and pool
        return run_serve(a, cli.threads);
    }
    pool.install(|| match cli.command {
        Command::Serve(_) => unreachable!("handled above"),
        Command::Train(a) => train_cmd::run(*a),
        Command::Finetune(a) => finetune_cmd::run(*a),
        Command::Merge(a) => finetune_cmd::merge(a),
        Command::Eval(c) => eval_cmd::run(c),
        Command::Generate(a) => run_generate(a),
        Command::Chat(a) => run_chat(a),
        Command::Explain(a) => run_explain(a),
        Command::Logits(a) => run_logits(a),
        Command::Score(a) => run_score(a),
        Command::Perplexity(a) => run_perplexity(a),
        Command::Quantize(a) => run_quantize(a),
        Command::Prepare(a) => run_prepare(a),
        Command::Tokenize(a) => run_tokenize(a),
        Command::Detokenize(a) => run_detokenize(a),
        Command::Tokenizer(TokenizerCommand::Train(a)) => run_tokenizer_train(a),
        Command::Bench(b) => run_bench(b),
    })
}

fn open_model(dir: &Path, tokenizer: Option<&Path>, adapter: Option<&Path>) -> Result<Opened> {
    Ok(quill::io::open_adapted(dir, tokenizer, adapter)?)
}

/// Sampling settings: the flags, then generation_config.json, then quill's defaults; only
/// ids the tokenizer can spell are drawn.
fn sampling(o: &Opened, a: &SamplingArgs) -> SamplingParams {
    SamplingParams {
        vocab_limit: o.tok.vocab_size(),
        ..a.params(&o.gen)
    }
}

fn require_template<'a>(o: &'a Opened, dir: &Path) -> Result<&'a ChatTemplate> {
    o.template.as_ref().with_context(|| {
        format!(
            "{}: the model has no chat template (chat_template in tokenizer_config.json, or chat_template.jinja)",
            dir.display()
        )
    })
}

fn run_generate(a: GenerateArgs) -> Result<()> {
    if a.model.is_file() && !quill::io::gguf::load::is_gguf(&a.model) {
        if a.beams.is_some_and(|b| b > 1) {
            bail!("--beams runs on model folders and GGUF files, not on llama2.c checkpoints");
        }
        let params = a.sampling.params(&GenerationConfig::default());
        let mut sampler = Sampler::new(params)?;
        return run_generate_llama2c(&a, &mut sampler);
    }
    let o = open_model(&a.model, a.tokenizer.as_deref(), a.adapter.as_deref())?;
    let mut sampler = Sampler::new(sampling(&o, &a.sampling))?;
    let max_new = a.max_new_tokens.or(o.gen.max_new_tokens).unwrap_or(500);
    let (model, tok) = (&o.model, &o.tok);
    let prompt = if a.chat {
        let t = require_template(&o, &a.model)?;
        let mut msgs = Vec::new();
        if let Some(sys) = &a.system {
            msgs.push(Message::new("system", sys));
        }
        msgs.push(Message::new("user", &a.prompt));
        tok.encode(&t.render(&msgs, true)?)
    } else {
        tok.encode_with_special(&a.prompt)
    }
    .context("the prompt cannot be encoded")?;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !a.chat {
        let ctx = model.context();
        let shown_prompt = if prompt.len() > ctx {
            tok.decode(&prompt[prompt.len() - ctx..])?
        } else {
            a.prompt.clone()
        };
        write!(out, "{shown_prompt}")?;
        out.flush()?;
    }
    let eos = &o.eos;
    if let Some(beams) = a.beams.filter(|&b| b > 1) {
        let b = BeamSearch {
            beams: beams as usize,
            max_new,
            length_penalty: 1.0,
        };
        let found = beam_search(model, &prompt, eos, b)?;
        writeln!(out, "{}", tok.decode(&found)?)?;
        return Ok(());
    }
    let mut stream = StreamDecoder::new();
    generate(
        model,
        &prompt,
        Stop { max_new, eos },
        &mut sampler,
        |ev| match ev {
            GenerateEvent::PromptTruncated { dropped, kept } => eprintln!(
                "warning: the prompt has {} tokens, more than the context; using its last {kept}",
                dropped + kept
            ),
            GenerateEvent::ContextShifted { kept } => eprintln!(
                "\nnote: the context of {} tokens is full; continuing from the last {kept}",
                model.context()
            ),
        },
        |id| {
            if !eos.contains(&id) {
                // a closed stdout (e.g. piped into `head`) ends generation quietly
                let text = stream.push(tok, id)?;
                let written = write!(out, "{text}").and_then(|_| out.flush());
                return Ok(written.is_ok());
            }
            Ok(true)
        },
    )?;
    let rest = stream.finish(tok)?;
    writeln!(out, "{rest}")?;
    Ok(())
}

fn bar(p: f32, width: usize) -> String {
    let n = (p.clamp(0.0, 1.0) * width as f32).round() as usize;
    "█".repeat(n)
}

fn run_explain(a: ExplainArgs) -> Result<()> {
    let o = open_model(&a.model, a.tokenizer.as_deref(), a.adapter.as_deref())?;
    let ids = o.tok.encode_with_special(&a.prompt)?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    let attention = match &a.attention {
        None => None,
        Some(spec) => {
            let (l, h) = spec
                .split_once(':')
                .and_then(|(l, h)| Some((l.parse::<usize>().ok()?, h.parse::<usize>().ok()?)))
                .with_context(|| format!("--attention {spec:?}: expected LAYER:HEAD, e.g. 0:1"))?;
            Some((l, h, o.model.attention_map(&ids, l, h)?))
        }
    };
    let params = sampling(&o, &a.sampling);
    let ex = quill::explain::explain(
        &o.model,
        &o.tok,
        &ids,
        params,
        quill::explain::Size {
            steps: a.steps,
            top: a.top.max(1),
        },
        &o.eos,
    )?;
    if a.json {
        let mut v = serde_json::to_value(&ex)?;
        if let Some((l, h, map)) = &attention {
            let t = ids.len();
            let rows: Vec<&[f32]> = map.chunks(t).collect();
            v["attention"] = serde_json::json!({"layer": l, "head": h, "weights": rows});
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "prompt: {} tokens; surprisal = -log2 p(token | the tokens before it)",
        ids.len()
    );
    println!("{:>5}  {:<20} {:>9} {:>7}", "pos", "token", "p", "bits");
    let mut total = 0.0;
    for (i, t) in ex.prompt.iter().enumerate() {
        match (t.prob, t.surprisal_bits) {
            (Some(prob), Some(bits)) => {
                total += bits;
                println!(
                    "{:>5}  {:<20} {:>9.5} {:>7.2}  {}",
                    i,
                    format!("{:?}", t.text),
                    prob,
                    bits,
                    bar(bits / 20.0, 20)
                );
            }
            _ => println!(
                "{:>5}  {:<20} {:>9} {:>7}",
                i,
                format!("{:?}", t.text),
                "-",
                "-"
            ),
        }
    }
    if ex.prompt.len() > 1 {
        println!(
            "mean surprisal {:.2} bits/token",
            total / (ex.prompt.len() - 1) as f32
        );
    }
    let p = &ex.params;
    for (n, st) in ex.steps.iter().enumerate() {
        println!(
            "\nstep {}: drew {:?} (p = {:.4} at temperature 1); the cut (temperature {}, top-k {}, top-p {}, min-p {}) kept {} token{}",
            n + 1,
            st.chosen_text,
            st.chosen_prob,
            p.temperature,
            if p.top_k == 0 { "off".to_string() } else { p.top_k.to_string() },
            p.top_p,
            if p.min_p == 0.0 { "off".to_string() } else { p.min_p.to_string() },
            st.kept_count,
            if st.kept_count == 1 { "" } else { "s" }
        );
        println!(
            "{:>5}  {:<20} {:>9} {:>9}  kept",
            "rank", "token", "p(T=1)", "p(cut)"
        );
        for (r, c) in st.candidates.iter().enumerate() {
            let kept = st.kept.iter().find(|(i, _)| *i == c.id).map(|x| x.1);
            println!(
                "{:>5}  {:<20} {:>9.5} {:>9}  {}{}",
                r + 1,
                format!("{:?}", c.text),
                c.prob,
                kept.map(|k| format!("{k:.5}"))
                    .unwrap_or_else(|| "-".into()),
                bar(c.prob, 30),
                if c.id == st.chosen { "  <- drawn" } else { "" }
            );
        }
        println!("{:>5}  {:<20} {:>9.5}", "", "(all others)", st.rest_prob);
    }
    if let Some((l, h, map)) = &attention {
        let t = ids.len();
        println!("\nattention of layer {l}, head {h}: row = query position, column = key position");
        for i in 0..t {
            let row: String = map[i * t..i * t + i + 1]
                .iter()
                .map(|&w| match (w * 8.0) as usize {
                    0 => ' ',
                    1 => '░',
                    2 | 3 => '▒',
                    4 | 5 => '▓',
                    _ => '█',
                })
                .collect();
            println!(
                "{:>5} {:<20} |{row}",
                i,
                format!("{:?}", o.tok.decode(&ids[i..i + 1])?)
            );
        }
    }
    Ok(())
}

fn run_serve(a: ServeArgs, threads: Option<usize>) -> Result<()> {
    let opts = quill_server::Options {
        model_dir: a.model.clone(),
        tokenizer: a.tokenizer.clone(),
        adapter: a.adapter.clone(),
        host: a.host,
        port: a.port,
        api_key: a.api_key,
        allow_hosts: a.allow_host,
        header_seconds: a.header_timeout,
        body_seconds: a.body_timeout,
        threads,
        queue: a.queue,
        max_active: a.max_active,
    };
    quill_server::run(opts, |addr| {
        eprintln!(
            "serving {} on http://{addr} (OpenAI API under /v1; Ctrl-C stops)",
            a.model.display()
        );
    })
    .map_err(|e| anyhow::anyhow!(e))
}

fn run_chat(a: ChatArgs) -> Result<()> {
    use std::io::{BufRead, IsTerminal};
    let o = open_model(&a.model, a.tokenizer.as_deref(), a.adapter.as_deref())?;
    // a llama2.c checkpoint has no chat template: each line is text the model continues;
    // a model folder or GGUF file without one is refused, as transformers refuses it
    let llama2c = a.model.is_file() && !quill::io::gguf::load::is_gguf(&a.model);
    let template = match llama2c {
        true => None,
        false => Some(require_template(&o, &a.model)?),
    };
    let (model, tok) = (&o.model, &o.tok);
    let mut sampler = Sampler::new(sampling(&o, &a.sampling))?;
    if template.is_none() {
        eprintln!("(a llama2.c checkpoint has no chat template: each line you write is text it continues)");
    }
    let ctx = model.context();
    let max_new = a.max_new_tokens.or(o.gen.max_new_tokens).unwrap_or(512);
    // room kept free for the reply when old turns are dropped
    let reserve = max_new.min(ctx / 2);
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} ({}). /reset starts over, /exit quits.",
            a.model.display(),
            model.describe()
        );
    }
    let system: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let stdout = std::io::stdout();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let text = line.trim_end_matches(['\r', '\n']);
        match text.trim() {
            "/exit" | "/quit" => break,
            "/reset" => {
                history.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            "" => continue,
            _ => {}
        }
        history.push(Message::new("user", text));
        let mut dropped = 0;
        let ids = loop {
            let msgs: Vec<Message> = system.iter().chain(&history).cloned().collect();
            let (rendered, ids) = match template {
                Some(t) => {
                    let r = t.render(&msgs, true)?;
                    let ids = tok.encode(&r)?;
                    (r, ids)
                }
                None => {
                    let r = plain_transcript(&msgs);
                    let ids = tok.encode_with_special(&r)?;
                    (r, ids)
                }
            };
            if ids.len() + reserve <= ctx || history.len() <= 1 {
                if a.show_prompt {
                    eprintln!("{}", serde_json::json!({ "prompt": rendered }));
                }
                break ids;
            }
            // drop the oldest turn: a user message and the reply that followed it
            let n = if history.len() > 2 && history[1].role == "assistant" {
                2
            } else {
                1
            };
            history.drain(..n);
            dropped += 1;
        };
        if dropped > 0 {
            eprintln!(
                "(the conversation outgrew the context of {ctx} tokens: dropped the {dropped} oldest turn{})",
                if dropped == 1 { "" } else { "s" }
            );
        }
        if ids.len() >= ctx {
            history.pop();
            let msg = format!(
                "this message makes a prompt of {} tokens, which does not fit the context of {ctx}",
                ids.len()
            );
            if interactive {
                eprintln!("error: {msg}");
                continue;
            }
            bail!(msg);
        }
        let mut out = stdout.lock();
        let mut stream = StreamDecoder::new();
        let mut reply_ids = Vec::new();
        let budget = max_new.min(ctx - ids.len());
        let eos = &o.eos;
        generate(
            model,
            &ids,
            Stop {
                max_new: budget,
                eos,
            },
            &mut sampler,
            |_| {},
            |id| {
                if eos.contains(&id) {
                    return Ok(true);
                }
                reply_ids.push(id);
                let piece = stream.push(tok, id)?;
                let written = write!(out, "{piece}").and_then(|_| out.flush());
                Ok(written.is_ok())
            },
        )?;
        let rest = stream.finish(tok)?;
        writeln!(out, "{rest}")?;
        out.flush()?;
        history.push(Message::new("assistant", &tok.decode(&reply_ids)?));
    }
    Ok(())
}

/// A conversation as plain text, for models without a chat template: turns on lines of
/// their own, each reply continuing the line before it.
fn plain_transcript(msgs: &[Message]) -> String {
    let mut text = String::new();
    for m in msgs {
        if m.role != "assistant" && !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&m.content);
    }
    text
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    let ids: Result<Vec<u32>> = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<u32>()
                .with_context(|| format!("--ids: {x:?} is not a token id"))
        })
        .collect();
    let ids = ids?;
    if ids.is_empty() {
        bail!("--ids is empty");
    }
    Ok(ids)
}

fn run_logits(a: LogitsArgs) -> Result<()> {
    let ids = parse_ids(&a.ids)?;
    let mut model = match a.dequantize {
        true => quill::io::load_model_dequantized(&a.model)?,
        false => quill::io::load_model(&a.model)?,
    };
    if let Some(dir) = &a.adapter {
        quill::io::adapt(&mut model, dir)?;
    }
    let (logits, v) = (model.logits_all(&ids)?, model.vocab_size());
    let rows: Vec<&[f32]> = logits.chunks(v).collect();
    let json = serde_json::json!({ "logits": rows });
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    serde_json::to_writer(&mut out, &json)?;
    writeln!(out)?;
    Ok(())
}

fn run_score(a: ScoreArgs) -> Result<()> {
    let o = open_model(&a.model, a.tokenizer.as_deref(), a.adapter.as_deref())?;
    let (model, tok) = (&o.model, &o.tok);
    let ids = tok.encode_with_special(&a.text)?;
    let sc = quill::sample::score(model, &ids, &tok.token_bytes())?;
    let rows: Vec<(String, u32, f64)> = sc
        .tokens
        .iter()
        .map(|&(id, lp)| Ok((tok.decode(&[id])?, id, lp)))
        .collect::<Result<_>>()?;
    let (mean, bpb) = (sc.mean_loss, sc.bits_per_byte);
    if a.json {
        let tokens: Vec<_> = rows
            .iter()
            .map(|(t, id, lp)| serde_json::json!({"token": t, "id": id, "logprob": lp}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"tokens": tokens, "mean_loss": mean, "bits_per_byte": bpb, "scored_tokens": rows.len()})
        );
    } else {
        println!("{:>6}  {:>8}  {:>10}  token", "pos", "id", "logprob");
        for (i, (t, id, lp)) in rows.iter().enumerate() {
            println!("{:>6}  {:>8}  {:>10.4}  {:?}", i + 1, id, lp, t);
        }
        println!(
            "scored tokens: {}  (the first token has no prediction)",
            rows.len()
        );
        println!("mean loss: {mean:.4} nats/token");
        println!("bits per byte: {bpb:.4}");
    }
    Ok(())
}

fn run_perplexity(a: PerplexityArgs) -> Result<()> {
    let o = open_model(&a.model, a.tokenizer.as_deref(), a.adapter.as_deref())?;
    let model = match a.dequantize {
        true => quill::io::load_model_dequantized(&a.model)?,
        false => o.model,
    };
    let text = read_utf8(&a.file)?;
    let mut ids = o.tok.encode(&text)?;
    let n = a.context.min(model.context());
    if a.chunks > 0 {
        ids.truncate(a.chunks.saturating_mul(n).max(n.min(ids.len())));
    }
    let quiet = a.json;
    let p = quill::sample::perplexity(&model, &ids, &o.tok.token_bytes(), n, |done, all, loss| {
        if !quiet {
            eprint!("\rchunk {done}/{all}: perplexity {:.4}", loss.exp());
        }
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"perplexity": p.perplexity, "mean_loss": p.mean_loss,
                "bits_per_byte": p.bits_per_byte, "chunks": p.chunks,
                "scored_tokens": p.scored_tokens, "context": n})
        );
    } else {
        eprintln!();
        println!(
            "perplexity {:.4}  ({:.4} nats/token, {:.4} bits per byte; {} chunks of {n} tokens, {} tokens scored)",
            p.perplexity, p.mean_loss, p.bits_per_byte, p.chunks, p.scored_tokens
        );
    }
    Ok(())
}

fn run_quantize(a: QuantizeArgs) -> Result<()> {
    use quill::io::gguf::export::{export, FileType};
    let ft = FileType::parse(&a.qtype)?;
    if a.out.is_dir() {
        bail!(
            "--out {} is a folder; name the GGUF file to write",
            a.out.display()
        );
    }
    let t0 = std::time::Instant::now();
    let w = export(&a.model, a.tokenizer.as_deref(), ft, &a.out)?;
    let types: Vec<String> = w.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "wrote {} ({}, {:.1} MB, {:.2} bits per parameter; tensors: {}) in {:.1} s",
        a.out.display(),
        ft.name(),
        w.bytes as f64 / 1e6,
        w.bytes as f64 * 8.0 / w.parameters.max(1) as f64,
        types.join(", "),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    match String::from_utf8(bytes) {
        Ok(s) => Ok(s),
        Err(e) => bail!(
            "{} is not valid UTF-8 (at byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ),
    }
}

fn tokenizer_from_spec(spec: &str) -> Result<Tokenizer> {
    if spec == "char" {
        bail!("a character-level tokenizer is built from a corpus: give its tokenizer.json or model folder");
    }
    let path = Path::new(spec);
    if path.is_file() && quill::io::gguf::load::is_gguf(path) {
        let g = quill::io::gguf::Gguf::open(path)?;
        return Ok(quill::io::gguf::load::tokenizer(&g)?.0);
    }
    Ok(Tokenizer::from_spec(spec)?)
}

fn run_tokenize(a: TokenizeArgs) -> Result<()> {
    let tok = tokenizer_from_spec(&a.tokenizer)?;
    let text = match (&a.text, &a.file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => read_utf8(f)?,
        (None, None) => bail!("give --text or --file"),
    };
    let ids = if a.plain {
        tok.encode_plain(&text)?
    } else {
        tok.encode(&text)?
    };
    println!("{}", serde_json::json!({ "ids": ids }));
    Ok(())
}

fn run_detokenize(a: DetokenizeArgs) -> Result<()> {
    let tok = tokenizer_from_spec(&a.tokenizer)?;
    let ids = parse_ids(&a.ids)?;
    let text = tok.decode(&ids)?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    writeln!(out)?;
    Ok(())
}

fn run_tokenizer_train(a: TokenizerTrainArgs) -> Result<()> {
    let tok = train_byte_level_bpe(&a.input, a.vocab_size)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let path = a.out.join("tokenizer.json");
    quill::io::atomic::write_text(&path, &tok.to_json()?)?;
    println!(
        "trained a byte-level BPE with {} tokens: {}",
        tok.vocab_size(),
        path.display()
    );
    Ok(())
}

fn run_prepare(a: PrepareArgs) -> Result<()> {
    use quill::data::prepare::{char_vocabulary, collect_sources, prepare, Options};
    let token_bytes = match a.dtype.as_str() {
        "auto" => None,
        "u16" => Some(2),
        "u32" => Some(4),
        other => bail!("--dtype {other:?}: expected auto, u16 or u32"),
    };
    let sources = collect_sources(&a.input)?;
    let tok = if a.tokenizer == "char" {
        Tokenizer::Char(char_vocabulary(&sources, a.lossy)?)
    } else {
        tokenizer_from_spec(&a.tokenizer)?
    };
    let opts = Options {
        val_fraction: a.val_fraction,
        token_bytes,
        shard_tokens: a.shard_tokens.max(1),
        lossy: a.lossy,
    };
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30.cyan/blue} {bytes}/{total_bytes}  {bytes_per_sec}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let meta = prepare(&sources, &tok, &a.out, &opts, &mut |done, total| {
        pb.set_length(total);
        pb.set_position(done);
    })?;
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "prepared {} documents, {:.1} MB in {:.1}s ({:.1} MB/s): {} train + {} validation tokens ({}) in {}",
        meta.documents,
        meta.bytes as f64 / 1e6,
        secs,
        meta.bytes as f64 / 1e6 / secs.max(1e-9),
        meta.train.tokens,
        meta.val.tokens,
        if meta.token_bytes == 2 { "u16" } else { "u32" },
        a.out.display()
    );
    Ok(())
}

/// Generation from a llama2.c checkpoint, printed as llama2.c's `run.c` prints it: BOS first,
/// the prompt's tokens forced, then sampled tokens until BOS, --max-new-tokens or the context.
fn run_generate_llama2c(a: &GenerateArgs, sampler: &mut Sampler) -> Result<()> {
    use quill::tokenizer::llama2c::BOS;
    let o = open_model(&a.model, a.tokenizer.as_deref(), a.adapter.as_deref())?;
    let (model, Tokenizer::Llama2c(tok)) = (&o.model, &o.tok) else {
        bail!("a llama2.c checkpoint needs a llama2.c tokenizer");
    };
    let ctx = model.context();
    let prompt = if a.prompt == "\n" {
        String::new()
    } else {
        a.prompt.clone()
    };
    let ids = tok.encode(&prompt, true);
    if ids.len() > ctx {
        bail!(
            "the prompt has {} tokens; the model's context is {}",
            ids.len(),
            ctx
        );
    }
    let mut out = std::io::stdout().lock();
    let mut cache = model.new_cache(ctx);
    let mut logits = Vec::new();
    sampler.start(&ids);
    let mut token = ids[0];
    let mut generated = 0;
    let mut pos = 0;
    while pos < ctx {
        model.forward_cached(&mut cache, &[token], &mut logits, false)?;
        let next = if pos + 1 < ids.len() {
            ids[pos + 1]
        } else {
            if generated == a.max_new_tokens.unwrap_or(500) {
                break;
            }
            generated += 1;
            sampler.draw(&logits).token
        };
        if next == BOS {
            break;
        }
        if out
            .write_all(&tok.decode_piece(token, next))
            .and_then(|_| out.flush())
            .is_err()
        {
            return Ok(());
        }
        token = next;
        pos += 1;
    }
    if pos == ctx {
        eprintln!("note: stopped at the model's context of {} positions", ctx);
    }
    writeln!(out)?;
    Ok(())
}

fn run_bench(b: BenchCommand) -> Result<()> {
    match b {
        BenchCommand::Peak { json } => {
            let p = quill::bench::peak();
            if json {
                println!("{}", serde_json::to_string(&p)?);
            } else {
                println!("CPU: {} ({} threads)", p.cpu, p.threads);
                println!("kernels: {}", p.kernels.describe());
                for (n, g) in &p.fp32_by_size {
                    println!("fp32 GEMM {n}x{n}x{n}: {g:.1} GFLOP/s");
                }
                println!(
                    "fp32 peak: {:.1} GFLOP/s ({} threads; quill's elementwise kernels: {})",
                    p.fp32_gflops, p.threads, p.kernels.f32
                );
                match p.bf16_gflops {
                    Some(g) => println!(
                        "bf16 products (f32 accumulation, quill's AVX-512 BF16 kernel): {g:.1} GFLOP/s"
                    ),
                    None if p.kernels.f32 != "scalar" => println!(
                        "bf16: no AVX-512 BF16 here (or QUILL_SIMD caps it): bf16 operands are rounded and multiplied by the f32 product"
                    ),
                    None => println!(
                        "bf16: no AVX-512 BF16 here (or QUILL_SIMD caps it): bf16 products take a plain path"
                    ),
                }
                println!(
                    "int8 products (Q8_0 weights, 16-bit activations, {}): {:.1} GOP/s",
                    p.kernels.int8, p.int8_gops
                );
                if p.kernels.amx_bf16 || p.kernels.amx_int8 {
                    println!("AMX: this CPU has tiles (bf16/int8); quill has no AMX kernel yet");
                } else {
                    println!("AMX: not on this CPU");
                }
                println!(
                    "memory bandwidth: read {:.1} GB/s, copy (read + write) {:.1} GB/s",
                    p.read_gbs, p.copy_gbs
                );
            }
        }
        BenchCommand::Train {
            config,
            batch,
            seq,
            steps,
            dtype,
            json,
            no_zero,
        } => {
            let precision = train_cmd::parse_dtype(&dtype)?;
            let cfg = quill::bench::train_config(&config)?;
            if steps == 0 {
                bail!("--steps must be at least 1");
            }
            let peaks = quill::bench::peak();
            // MFU against the peak of the precision the products run in
            let peak = match precision {
                quill::kernels::matmul::Precision::F32 => peaks.fp32_gflops,
                quill::kernels::matmul::Precision::Bf16 => {
                    peaks.bf16_gflops.unwrap_or(peaks.fp32_gflops)
                }
            };
            let comm = quill::train::dist::from_env()?;
            let opts = quill::bench::TrainBenchOptions {
                batch: batch.unwrap_or(cfg.batch),
                seq: seq.unwrap_or(cfg.seq),
                steps,
                precision,
                peak_gflops: Some(peak),
                comm: comm.clone(),
                zero: !no_zero,
            };
            let r = train_cmd::on_ranks(comm.clone(), |_| Ok(quill::bench::train(&cfg, &opts)?))?;
            if comm.rank() != 0 {
                return Ok(());
            }
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}; kernels: {}", r.cpu, r.kernels.describe());
                println!(
                    "{} ({}): {:.0} tokens/s (best {:.0}), batch {} x {}, {}{} threads, {:.2}M parameters",
                    r.config,
                    r.dtype,
                    r.tokens_per_sec,
                    r.best_tokens_per_sec,
                    r.batch,
                    r.seq,
                    if r.ranks > 1 {
                        format!("{} ranks x ", r.ranks)
                    } else {
                        String::new()
                    },
                    r.threads,
                    r.params as f64 / 1e6
                );
                if r.ranks > 1 {
                    let m = &r.memory;
                    let mb = |b: u64| b as f64 / 1e6;
                    println!(
                        "per rank: parameters {:.1} MB, gradients {:.1} MB, AdamW moments {:.1} MB ({}), exchange {:.1} MB, activations {:.1} MB; {:.1} MB in all",
                        mb(m.params),
                        mb(m.grads),
                        mb(m.moments),
                        if r.zero {
                            format!("ZeRO-1: 1/{} of them", r.ranks)
                        } else {
                            "whole".into()
                        },
                        mb(m.exchange),
                        mb(m.activations),
                        mb(m.total())
                    );
                }
                println!(
                    "MFU {:.1}% of the measured {} peak {:.1} GFLOP/s (flops/token = 6*{} + 12*L*C*T = {:.0})",
                    100.0 * r.mfu.unwrap_or(0.0),
                    if peaks.bf16_gflops.is_some() { r.dtype } else { "fp32" },
                    peak,
                    r.n_for_flops,
                    r.flops_per_token
                );
                if let Some(rss) = r.peak_rss {
                    println!(
                        "peak RSS {:.1} MB; accounted {:.1} MB (RSS before the model + 4 B per parameter, gradient, AdamW moment and activation value held)",
                        rss as f64 / 1e6,
                        r.accounted_bytes as f64 / 1e6
                    );
                }
            }
        }
        BenchCommand::Generate {
            model,
            prompt_len,
            new,
            json,
        } => {
            let before = quill::bench::bandwidth();
            quill::bench::reset_peak_rss();
            let m = quill::io::load_model(&model)?;
            let mut r = quill::bench::generate(&m, &model.display().to_string(), prompt_len, new)?;
            // the memory's speed can move between runs on a shared host: the share is taken
            // against the higher of two measurements, one on each side of the decoding
            let after = quill::bench::bandwidth();
            let bw = before.max(after);
            r.against(bw);
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}; kernels: {}", r.cpu, r.kernels.describe());
                println!(
                    "{} ({}, {:.1}M parameters, {} threads)",
                    r.model,
                    r.architecture,
                    r.params as f64 / 1e6,
                    r.threads
                );
                println!(
                    "prompt: {:.1} tokens/s ({} tokens, best of 3)",
                    r.prompt_tokens_per_sec, r.prompt_len
                );
                println!(
                    "decode: {:.1} tokens/s at batch 1 ({} tokens after the prompt)",
                    r.decode_tokens_per_sec, r.new_tokens
                );
                println!(
                    "bandwidth: {:.1} MB of weights per token -> {:.1} GB/s",
                    r.weight_bytes_per_token as f64 / 1e6,
                    r.decode_gbs,
                );
                let p = &r.paired;
                println!(
                    "  {:.0}% of the read bandwidth beside it (median of {} rounds, each against a read just after it; probes' median {:.1} GB/s; rounds {})",
                    100.0 * p.share,
                    p.rounds,
                    p.read_gbs,
                    p.shares
                        .iter()
                        .map(|s| format!("{:.0}%", 100.0 * s))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                println!(
                    "  {:.0}% of the higher of two 1 GiB probes, {:.1} GB/s ({:.1} before the model is opened, {:.1} after decoding; copy: {:.1})",
                    100.0 * r.bandwidth_util.unwrap_or(0.0),
                    bw.read_gbs,
                    before.read_gbs,
                    after.read_gbs,
                    bw.copy_gbs
                );
                if let Some(rss) = r.peak_rss {
                    println!("peak RSS {:.1} MB", rss as f64 / 1e6);
                }
            }
        }
    }
    Ok(())
}
