//! Fine-tuning examples: JSONL records turned into token ids with a mask of the tokens the
//! model learns to write, and packed into fixed-length windows.
//!
//! A record is one of
//! - `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation, rendered with the
//!   model's chat template; the assistant's turns are learned (their end-of-turn token
//!   included), everything else is context;
//! - `{"prompt": ..., "completion": ...}`: plain text; the completion and an end-of-text token
//!   after it are learned;
//! - `{"text": ...}`: plain text, all of it learned.
//!
//! Packing puts several examples in one window of the training context without letting them
//! see each other: each window carries, for every row, where its example starts
//! ([`crate::model::Model::forward_packed`]), and the targets of context rows, of each
//! example's last row and of padding are [`IGNORE`].

use crate::chat::{ChatTemplate, Message};
use crate::kernels::crossentropy::IGNORE;
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// One example: its tokens, which of them are learned (predicted with a loss), and the line
/// of the file it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub learn: Vec<bool>,
    pub line: usize,
}

impl Example {
    /// Tokens the loss counts: the learned ones after the first.
    pub fn learned(&self) -> usize {
        self.learn.iter().skip(1).filter(|&&l| l).count()
    }
}

/// How records become tokens: the model's tokenizer, its chat template (for `messages`),
/// the token that ends a completion, and how a `.tsv` file's pairs become conversations.
pub struct Format<'a> {
    pub tok: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    pub eos: Option<u32>,
    pub pairs: Pairs,
}

/// A `.tsv` line `source<TAB>target` becomes a conversation: the optional system message,
/// the user asking `instruction source`, the assistant answering `target`; or, with a
/// [`PairTemplate`], plain text.
#[derive(Clone, Debug, Default)]
pub struct Pairs {
    pub instruction: String,
    pub system: Option<String>,
    pub template: Option<PairTemplate>,
}

/// A pair written as plain text instead of a conversation, from a template such as
/// `English: {source}\nFrench: {target}`: everything before `{target}` is the prompt (with
/// the source in place of `{source}`), and the target, whatever follows `{target}`, and an
/// end token are learned. Spaces that end the prompt's part move to the start of the
/// completion, so that the target's first word is written with its leading space, as BPE
/// vocabularies spell words inside text (`French: Stop` is `French`, `:`, ` Stop`). The
/// template's `\n`, `\t` and `\\` stand for a newline, a tab and a backslash, so that it can
/// be given on a command line.
#[derive(Clone, Debug, PartialEq)]
pub struct PairTemplate {
    /// Before `{source}`.
    head: String,
    /// Between `{source}` and `{target}`, without the spaces that end it.
    mid: String,
    /// The spaces that ended `mid`, and what follows `{target}`.
    lead: String,
    tail: String,
}

impl PairTemplate {
    pub fn parse(text: &str) -> Result<Self> {
        let mut t = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                t.push(c);
                continue;
            }
            match chars.next() {
                Some('n') => t.push('\n'),
                Some('t') => t.push('\t'),
                Some('\\') => t.push('\\'),
                Some(other) => {
                    t.push('\\');
                    t.push(other);
                }
                None => t.push('\\'),
            }
        }
        let once = |k: &str| t.matches(k).count() == 1;
        let (Some(s), Some(g)) = (t.find("{source}"), t.find("{target}")) else {
            return Err(Error::Input(format!(
                "the pair template '{text}' needs {{source}} and then {{target}}"
            )));
        };
        if !once("{source}") || !once("{target}") || g < s {
            return Err(Error::Input(format!(
                "the pair template '{text}' needs {{source}} and then {{target}}, once each"
            )));
        }
        let between = &t[s + "{source}".len()..g];
        let mid = between.trim_end_matches([' ', '\t']);
        Ok(PairTemplate {
            head: t[..s].to_string(),
            mid: mid.to_string(),
            lead: between[mid.len()..].to_string(),
            tail: t[g + "{target}".len()..].to_string(),
        })
    }

    /// What the model reads before it writes the target.
    pub fn prompt(&self, source: &str) -> String {
        format!("{}{}{}", self.head, source, self.mid)
    }

    /// What the model learns to write after the prompt (before the end token).
    pub fn completion(&self, target: &str) -> String {
        format!("{}{}{}", self.lead, target, self.tail)
    }
}

impl Pairs {
    fn record(&self, line: &str) -> std::result::Result<Value, String> {
        let (src, tgt) = line.split_once('\t').ok_or("expected source<TAB>target")?;
        let tgt = tgt.split('\t').next().unwrap_or("");
        if let Some(t) = &self.template {
            return Ok(serde_json::json!({
                "prompt": t.prompt(src.trim()),
                "completion": t.completion(tgt.trim()),
            }));
        }
        let user = if self.instruction.is_empty() {
            src.trim().to_string()
        } else {
            format!("{} {}", self.instruction, src.trim())
        };
        let mut messages = Vec::new();
        if let Some(s) = &self.system {
            messages.push(serde_json::json!({"role": "system", "content": s}));
        }
        messages.push(serde_json::json!({"role": "user", "content": user}));
        messages.push(serde_json::json!({"role": "assistant", "content": tgt.trim()}));
        Ok(serde_json::json!({ "messages": messages }))
    }
}

/// Reads a JSONL file of records, or a `.tsv` file of pairs (blank lines skipped). Errors
/// name the file and the line.
pub fn read_jsonl(path: &Path, format: &Format) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let tsv = path.extension().is_some_and(|e| e == "tsv");
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| Error::format(path, format!("line {}: {msg}", i + 1));
        let v: Value = if tsv {
            format.pairs.record(line).map_err(at)?
        } else {
            serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?
        };
        let (ids, learn) = example(&v, format).map_err(at)?;
        out.push(Example {
            ids,
            learn,
            line: i + 1,
        });
    }
    if out.is_empty() {
        return Err(Error::format(path, "no records (one JSON object per line)"));
    }
    Ok(out)
}

type Tokens = (Vec<u32>, Vec<bool>);

/// One record's tokens and mask, or what is wrong with it.
fn example(v: &Value, f: &Format) -> std::result::Result<Tokens, String> {
    let text_field = |k: &str| -> std::result::Result<Option<&str>, String> {
        match v.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("\"{k}\" must be a string")),
        }
    };
    let enc = |s: &str| f.tok.encode(s).map_err(|e| e.to_string());
    if let Some(m) = v.get("messages") {
        return messages(m, f);
    }
    match (
        text_field("prompt")?,
        text_field("completion")?,
        text_field("text")?,
    ) {
        (Some(prompt), Some(completion), _) => {
            let p = f.tok.encode_with_special(prompt).map_err(|e| e.to_string())?;
            let mut c = enc(completion)?;
            c.extend(f.eos);
            Ok(joined(&[(p, false), (c, true)]))
        }
        (Some(_), None, _) => Err("a \"prompt\" needs a \"completion\"".into()),
        (None, Some(_), _) => Err("a \"completion\" needs a \"prompt\"".into()),
        (None, None, Some(text)) => {
            let mut ids = f.tok.encode_with_special(text).map_err(|e| e.to_string())?;
            ids.extend(f.eos);
            let n = ids.len();
            Ok((ids, vec![true; n]))
        }
        (None, None, None) => Err(
            "expected {\"messages\": [...]}, {\"prompt\": ..., \"completion\": ...} or {\"text\": ...}"
                .into(),
        ),
    }
}

fn joined(parts: &[(Vec<u32>, bool)]) -> Tokens {
    let mut ids = Vec::new();
    let mut learn = Vec::new();
    for (p, l) in parts {
        ids.extend_from_slice(p);
        learn.extend(std::iter::repeat_n(*l, p.len()));
    }
    (ids, learn)
}

/// A conversation: rendered whole, and prefix by prefix to find where each assistant turn
/// starts and ends in the text; the pieces are tokenized one by one, so that every learned
/// token comes from an assistant turn alone.
fn messages(m: &Value, f: &Format) -> std::result::Result<Tokens, String> {
    let Some(template) = f.template else {
        return Err(
            "\"messages\" are rendered with the model's chat template, and this model has none (use \"prompt\" and \"completion\")"
                .into(),
        );
    };
    let list = m
        .as_array()
        .ok_or("\"messages\" must be a list of {\"role\", \"content\"} objects")?;
    let mut msgs = Vec::with_capacity(list.len());
    for (k, x) in list.iter().enumerate() {
        let field = |name: &str| {
            x.get(name)
                .and_then(Value::as_str)
                .ok_or(format!("message {} has no \"{name}\" string", k + 1))
        };
        msgs.push(Message::new(field("role")?, field("content")?));
    }
    if !msgs.iter().any(|m| m.role == "assistant") {
        return Err("no \"assistant\" message to learn".into());
    }
    let render =
        |msgs: &[Message], gen: bool| template.render(msgs, gen).map_err(|e| e.to_string());
    let full = render(&msgs, false)?;
    let mut cuts = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&msgs[..i], true)?;
        let through = render(&msgs[..=i], false)?;
        let last = cuts.last().map_or(0, |&(_, e)| e);
        if !through.starts_with(&before) || !full.starts_with(&through) || before.len() < last {
            return Err("the chat template does not render this conversation turn by turn (each prefix a prefix of the whole), so the assistant's tokens cannot be told apart".into());
        }
        // whitespace after the turn's end (ChatML's newline after <|im_end|>) is context:
        // the model learns to end its turn, not what the template puts between turns
        let end = before.len() + through[before.len()..].trim_end().len();
        cuts.push((before.len(), end));
    }
    let mut parts = Vec::new();
    let mut at = 0;
    for (start, end) in cuts {
        parts.push((&full[at..start], false));
        parts.push((&full[start..end], true));
        at = end;
    }
    parts.push((&full[at..], false));
    let parts = parts
        .into_iter()
        .filter(|(s, _)| !s.is_empty())
        .map(|(s, l)| f.tok.encode(s).map(|ids| (ids, l)))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| e.to_string())?;
    Ok(joined(&parts))
}

/// Windows [n, T] of packed examples: ids, the targets each row predicts, and where each
/// row's example starts in its window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Packed {
    pub t: usize,
    pub ids: Vec<u32>,
    pub targets: Vec<u32>,
    pub starts: Vec<u32>,
    /// Targets counted by the loss.
    pub learned: usize,
}

impl Packed {
    pub fn len(&self) -> usize {
        self.ids.len().checked_div(self.t).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Window `w`'s (ids, targets, starts).
    pub fn window(&self, w: usize) -> (&[u32], &[u32], &[u32]) {
        let r = w * self.t..(w + 1) * self.t;
        (
            &self.ids[r.clone()],
            &self.targets[r.clone()],
            &self.starts[r],
        )
    }

    /// Identifies the windows, so a resumed run can tell it has the same data.
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for x in self.ids.iter().chain(&self.targets).chain(&self.starts) {
            h = (h ^ *x as u64).wrapping_mul(0x0100_0000_01b3);
        }
        format!("packed:{}x{}:{h:016x}", self.len(), self.t)
    }
}

/// What packing left out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Left {
    /// Lines of examples longer than the window.
    pub too_long: Vec<usize>,
    /// Lines of examples with nothing to learn.
    pub nothing_learned: Vec<usize>,
}

/// Packs examples into windows of `t` tokens, longest first, each into the fullest window
/// it fits (best fit decreasing); the rest of a window is padding (`pad`, nothing learned).
/// Examples longer than `t`, or with nothing to learn, are left out and reported.
pub fn pack(examples: &[Example], t: usize, pad: u32) -> (Packed, Left) {
    let mut left = Left::default();
    let mut order: Vec<&Example> = Vec::new();
    for e in examples {
        if e.ids.len() > t {
            left.too_long.push(e.line);
        } else if e.learned() == 0 {
            left.nothing_learned.push(e.line);
        } else {
            order.push(e);
        }
    }
    order.sort_by_key(|e| std::cmp::Reverse(e.ids.len()));
    // windows by the room they have left: the smallest room that still fits comes first
    let mut room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut windows: Vec<Vec<&Example>> = Vec::new();
    for e in order {
        let n = e.ids.len();
        let fit = room.range(n..).next().map(|(&r, _)| r);
        let w = match fit {
            Some(r) => {
                let list = room.get_mut(&r).expect("listed");
                let w = list.pop().expect("non-empty");
                if list.is_empty() {
                    room.remove(&r);
                }
                if r > n {
                    room.entry(r - n).or_default().push(w);
                }
                w
            }
            None => {
                windows.push(Vec::new());
                if t > n {
                    room.entry(t - n).or_default().push(windows.len() - 1);
                }
                windows.len() - 1
            }
        };
        windows[w].push(e);
    }
    let mut p = Packed {
        t,
        ..Default::default()
    };
    for w in windows {
        let mut at = 0;
        for e in w {
            let n = e.ids.len();
            p.ids.extend_from_slice(&e.ids);
            for j in 0..n {
                let learned = j + 1 < n && e.learn[j + 1];
                p.targets.push(if learned { e.ids[j + 1] } else { IGNORE });
                p.learned += learned as usize;
            }
            p.starts.extend(std::iter::repeat_n(at as u32, n));
            at += n;
        }
        if at < t {
            p.ids.extend(std::iter::repeat_n(pad, t - at));
            p.targets.extend(std::iter::repeat_n(IGNORE, t - at));
            p.starts.extend(std::iter::repeat_n(at as u32, t - at));
        }
    }
    (p, left)
}

/// Splits examples into (train, validation): `fraction` of them, chosen by a seeded shuffle,
/// held out (at least one when the fraction is above 0 and there are two or more).
pub fn split(examples: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    let mut k = (n as f64 * fraction).round() as usize;
    if fraction > 0.0 && n >= 2 {
        k = k.clamp(1, n - 1);
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed ^ 0x5f7_5e1e_c7ed);
    for i in (1..n).rev() {
        idx.swap(i, rng.below(i + 1));
    }
    let held: std::collections::HashSet<usize> = idx[..k].iter().copied().collect();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, e) in examples.into_iter().enumerate() {
        if held.contains(&i) {
            val.push(e);
        } else {
            train.push(e);
        }
    }
    (train, val)
}

/// The order windows are visited in during epoch `epoch`: a permutation of 0..n seeded by
/// the run's seed and the epoch (so a resumed run visits the same windows).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xe90c);
    for i in (1..n).rev() {
        idx.swap(i, rng.below(i + 1));
    }
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(n: usize, prompt: usize, line: usize) -> Example {
        Example {
            ids: (0..n as u32).map(|i| 100 * line as u32 + i).collect(),
            learn: (0..n).map(|i| i >= prompt).collect(),
            line,
        }
    }

    #[test]
    fn pair_templates_split_at_the_target_and_refuse_what_they_cannot() {
        let t = PairTemplate::parse(r"English: {source}\nFrench: {target}").unwrap();
        assert_eq!(t.prompt("Stop!"), "English: Stop!\nFrench:");
        assert_eq!(t.completion("Arrête !"), " Arrête !");
        // escapes, a tab before the target, text after it, an unknown escape kept
        let t = PairTemplate::parse(r"<{source}>\t{target}\\\q").unwrap();
        assert_eq!(t.prompt("a"), "<a>");
        assert_eq!(t.completion("b"), "\tb\\\\q");
        let t = PairTemplate::parse("Q: {source}\nA:\n{target}").unwrap();
        assert_eq!(
            (t.prompt("x").as_str(), t.completion("y").as_str()),
            ("Q: x\nA:\n", "y")
        );
        for bad in [
            "{source} only",
            "{target} only",
            "{target} {source}",
            "{source} {source} {target}",
            "{source} {target} {target}",
        ] {
            let e = PairTemplate::parse(bad).unwrap_err().to_string();
            assert!(e.contains("{source} and then {target}"), "{e}");
        }
    }

    #[test]
    fn packing_keeps_every_learned_token_once_and_examples_apart() {
        let examples: Vec<Example> = [
            (5, 2),
            (7, 3),
            (3, 1),
            (9, 4),
            (2, 1),
            (16, 8),
            (17, 1),
            (4, 4),
        ]
        .iter()
        .enumerate()
        .map(|(i, &(n, p))| ex(n, p, i + 1))
        .collect();
        let (p, left) = pack(&examples, 16, 0);
        assert_eq!(left.too_long, vec![7]);
        assert_eq!(left.nothing_learned, vec![8]);
        let kept: Vec<&Example> = examples.iter().filter(|e| e.line < 7).collect();
        assert_eq!(p.learned, kept.iter().map(|e| e.learned()).sum::<usize>());
        // best fit decreasing: 16 | 9+7 | 5+3+2 = 3 windows
        assert_eq!(p.len(), 3);
        // every example appears whole, at a start its rows name, with its own targets
        for e in &kept {
            let n = e.ids.len();
            let at = (0..p.ids.len() - n + 1)
                .find(|&i| p.ids[i..i + n] == e.ids[..])
                .expect("packed");
            assert!(p.starts[at..at + n].iter().all(|&s| s as usize == at % 16));
            for j in 0..n {
                let want = if j + 1 < n && e.learn[j + 1] {
                    e.ids[j + 1]
                } else {
                    IGNORE
                };
                assert_eq!(p.targets[at + j], want);
            }
        }
        // padding learns nothing and starts its own run of rows
        let pads = p.targets.iter().filter(|&&x| x == IGNORE).count();
        assert!(pads > 0);
    }

    #[test]
    fn splits_and_epoch_orders_are_permutations_and_reproducible() {
        let examples: Vec<Example> = (1..=20).map(|i| ex(3, 1, i)).collect();
        let (a, b) = split(examples.clone(), 0.1, 7);
        assert_eq!((a.len(), b.len()), (18, 2));
        assert_eq!(split(examples.clone(), 0.1, 7), (a, b));
        let (_, none) = split(examples, 0.0, 7);
        assert!(none.is_empty());
        let o = epoch_order(50, 3, 1);
        let mut s = o.clone();
        s.sort();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
        assert_eq!(o, epoch_order(50, 3, 1));
        assert_ne!(o, epoch_order(50, 3, 2));
    }
}
