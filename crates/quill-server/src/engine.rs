//! The engine: one thread owns the model and runs every request's tokens. Requests wait in a
//! bounded queue. Continuous batching: each round draws one token for every running request
//! and runs all of them through the model in one batched pass (the weights are read once for
//! the whole batch); a request joins (after its prompt's own pass) or leaves between rounds.
//! Each request streams its text back through a channel; a dropped receiver (the client went
//! away) ends it.

use quill::model::{Cache, Model, Rows, Scratch, Segment};
use quill::sample::{top_logprobs, Sampler, SamplingParams};
use quill::tokenizer::{StreamDecoder, Tokenizer};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// Requests running at once by default; more wait in the queue.
pub const MAX_ACTIVE: usize = 64;

pub struct Job {
    /// For the log line written when the request ends.
    pub id: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// Every logits processor's settings (penalties, temperature, top-k/p, min-p, seed).
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Some(k): report each token's log-probability and the k most likely alternatives.
    pub logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
}

#[derive(Clone, Debug)]
pub struct TokenInfo {
    pub id: u32,
    pub text: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Debug)]
pub enum Event {
    /// New text, and the tokens it was written with (their text may come out later than
    /// the token when it could begin a stop string).
    Text {
        text: String,
        tokens: Vec<TokenInfo>,
    },
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

pub struct Shared {
    pub model: Model,
    pub tok: Tokenizer,
    pub eos: Vec<u32>,
}

#[derive(Clone)]
pub struct Handle {
    tx: SyncSender<Job>,
}

pub enum SubmitError {
    QueueFull,
    Stopped,
}

impl Handle {
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => SubmitError::QueueFull,
            TrySendError::Disconnected(_) => SubmitError::Stopped,
        })
    }
}

/// Starts the engine thread with `threads` worker threads for the numerics and a queue of
/// `queue` waiting requests.
pub fn spawn(
    shared: Arc<Shared>,
    threads: Option<usize>,
    queue: usize,
    max_active: usize,
) -> Handle {
    let (tx, rx) = sync_channel(queue);
    std::thread::Builder::new()
        .name("quill-engine".into())
        .spawn(move || {
            let mut b = rayon::ThreadPoolBuilder::new();
            if let Some(n) = threads {
                b = b.num_threads(n);
            }
            let pool = b.build().expect("thread pool");
            pool.install(|| run(&shared, rx, max_active.max(1)));
        })
        .expect("engine thread");
    Handle { tx }
}

struct Seq {
    job: Job,
    cache: Cache,
    logits: Vec<f32>,
    sampler: Sampler,
    generated: usize,
    decoder: StreamDecoder,
    text: String,
    emitted: usize,
    pending: Vec<TokenInfo>,
    stopped: bool,
    done: bool,
    finish_reason: Option<&'static str>,
    started: std::time::Instant,
}

impl Drop for Seq {
    fn drop(&mut self) {
        let how = self
            .finish_reason
            .unwrap_or("cancelled (the client went away)");
        eprintln!(
            "{}: {} prompt + {} completion tokens, {} in {:.2} s",
            self.job.id,
            self.job.prompt.len(),
            self.generated,
            how,
            self.started.elapsed().as_secs_f64()
        );
    }
}

fn run(shared: &Shared, rx: Receiver<Job>, max_active: usize) {
    let mut active: Vec<Seq> = Vec::new();
    let mut scratch = Scratch::default();
    let mut logits = Vec::new();
    loop {
        while active.len() < max_active {
            let job = if active.is_empty() {
                release_free_memory();
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
                }
            };
            if let Some(seq) = start(shared, job) {
                active.push(seq);
            }
        }
        round(shared, &mut active, &mut scratch, &mut logits);
        active.retain(|s| !s.done);
    }
}

/// One token for every running request, then one batched pass over the model.
fn round(shared: &Shared, active: &mut [Seq], scratch: &mut Scratch, logits: &mut Vec<f32>) {
    let mut next = Vec::with_capacity(active.len());
    for s in active.iter_mut() {
        match pick(shared, s) {
            Some(t) => next.push(t),
            None => s.done = true,
        }
    }
    if next.is_empty() {
        return;
    }
    // each running request is a segment of one token continuing its own cache
    let mut segs: Vec<Segment> = active
        .iter_mut()
        .filter(|s| !s.done)
        .zip(next.chunks(1))
        .map(|(s, ids)| Segment {
            cache: &mut s.cache,
            ids,
        })
        .collect();
    let result = shared.model.step(&mut segs, Rows::Last, logits, scratch);
    drop(segs);
    let v = shared.model.vocab_size();
    for (i, s) in active.iter_mut().filter(|s| !s.done).enumerate() {
        match &result {
            Ok(()) => s.logits.copy_from_slice(&logits[i * v..(i + 1) * v]),
            Err(e) => {
                let _ = s.job.events.send(Event::Error(e.to_string()));
                s.finish_reason = Some("failed");
                s.done = true;
            }
        }
    }
}

/// Hands memory freed by finished requests back to the system when the engine goes idle
/// (glibc keeps freed heap pages otherwise), so the server returns to its baseline.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // Safety: malloc_trim only releases free memory of glibc's own heap.
        unsafe {
            malloc_trim(0);
        }
    }
}

fn start(shared: &Shared, job: Job) -> Option<Seq> {
    let m = &shared.model;
    let cap = (job.prompt.len() + job.max_tokens).min(m.context());
    let mut cache = m.new_cache(cap);
    let mut logits = Vec::new();
    if job.events.is_closed() {
        return None;
    }
    if let Err(e) = m.forward_cached(&mut cache, &job.prompt, &mut logits, false) {
        let _ = job.events.send(Event::Error(e.to_string()));
        return None;
    }
    let sampler = match Sampler::new(job.sampling.clone()) {
        Ok(mut s) => {
            s.start(&job.prompt);
            s
        }
        Err(e) => {
            let _ = job.events.send(Event::Error(e.to_string()));
            return None;
        }
    };
    Some(Seq {
        job,
        cache,
        logits,
        sampler,
        generated: 0,
        decoder: StreamDecoder::new(),
        text: String::new(),
        emitted: 0,
        pending: Vec::new(),
        stopped: false,
        done: false,
        finish_reason: None,
        started: std::time::Instant::now(),
    })
}

/// Draws the next token of `s` from its logits and sends the text it completes. Some(token)
/// when the request goes on (the token must then run through the model), None when it has
/// finished (or its client left).
fn pick(shared: &Shared, s: &mut Seq) -> Option<u32> {
    if s.job.events.is_closed() {
        return None;
    }
    let j = &s.job;
    let draw = s.sampler.draw(&s.logits);
    let next = draw.token;
    if shared.eos.contains(&next) {
        return finish(shared, s, "stop");
    }
    s.generated += 1;
    let piece = s.decoder.push(&shared.tok, next).unwrap_or_default();
    s.text.push_str(&piece);
    if let Some(k) = j.logprobs {
        // log-probabilities are the model's own (before penalties and temperature)
        let limit = s.sampler.params.vocab_limit.clamp(1, s.logits.len());
        let top = top_logprobs(&s.logits[..limit], k)
            .into_iter()
            .map(|(i, lp)| (shared.tok.decode(&[i]).unwrap_or_default(), lp))
            .collect();
        let text = shared.tok.decode(&[next]).unwrap_or_default();
        s.pending.push(TokenInfo {
            id: next,
            bytes: text.as_bytes().to_vec(),
            text,
            logprob: draw.logprob,
            top,
        });
    }
    // a stop string ends the text just before it
    if let Some(p) = first_stop(&s.text, &s.job.stop, s.emitted) {
        s.text.truncate(p);
        s.stopped = true;
        return finish(shared, s, "stop");
    }
    if s.generated >= s.job.max_tokens || s.cache.len() >= s.cache.capacity() {
        return finish(shared, s, "length");
    }
    // release what cannot be the start of a stop string
    let hold = s.job.stop.iter().map(|x| x.len()).max().unwrap_or(1) - 1;
    let mut safe = s.text.len().saturating_sub(hold).max(s.emitted);
    while !s.text.is_char_boundary(safe) {
        safe -= 1;
    }
    if safe > s.emitted || !s.pending.is_empty() {
        let text = s.text[s.emitted..safe].to_string();
        s.emitted = safe;
        let tokens = std::mem::take(&mut s.pending);
        if s.job.events.send(Event::Text { text, tokens }).is_err() {
            return None;
        }
    }
    Some(next)
}

fn first_stop(text: &str, stops: &[String], emitted: usize) -> Option<usize> {
    let longest = stops.iter().map(|x| x.len()).max()?;
    let mut from = emitted.saturating_sub(longest);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    stops
        .iter()
        .filter(|x| !x.is_empty())
        .filter_map(|x| text[from..].find(x.as_str()).map(|p| p + from))
        .min()
}

fn finish(shared: &Shared, s: &mut Seq, reason: &'static str) -> Option<u32> {
    if !s.stopped {
        // bytes of an unfinished character the decoder still holds
        s.text
            .push_str(&s.decoder.finish(&shared.tok).unwrap_or_default());
    }
    if s.emitted < s.text.len() || !s.pending.is_empty() {
        let text = s.text[s.emitted.min(s.text.len())..].to_string();
        s.emitted = s.text.len();
        let tokens = std::mem::take(&mut s.pending);
        let _ = s.job.events.send(Event::Text { text, tokens });
    }
    s.finish_reason = Some(reason);
    let _ = s.job.events.send(Event::Done {
        finish_reason: reason,
        prompt_tokens: s.job.prompt.len(),
        completion_tokens: s.generated,
    });
    None
}

#[cfg(test)]
mod tests {
    use super::first_stop;

    #[test]
    fn stop_strings_are_found_across_pieces() {
        let stops = vec!["END".to_string(), "\n\n".to_string()];
        assert_eq!(first_stop("abc", &stops, 0), None);
        assert_eq!(first_stop("abcEN", &stops, 3), None);
        // the text released so far ended at 3 ("abc"); "END" straddles that point
        assert_eq!(first_stop("abcEND more", &stops, 3), Some(3));
        assert_eq!(first_stop("a\n\nbEND", &stops, 0), Some(1));
        assert_eq!(first_stop("héllo wörld", &["ö".to_string()], 2), Some(8));
        assert_eq!(first_stop("x", &[], 0), None);
    }
}
