//! `quill prepare`: tokenise plain-text and JSONL corpora into token shards, streaming.
//!
//! Memory stays bounded whatever the corpus size: text is read in blocks of `BLOCK` bytes,
//! cut at line starts into pieces, and a batch of at most `BATCH` bytes of pieces is
//! tokenised in parallel and written out before the next is read. Peak use is a few times
//! BATCH (text, tokens, per-piece caches) plus the tokenizer itself: 101 MB measured with
//! GPT-2's tokenizer on a 2 GB corpus, the same as on 50 MB.
//!
//! The validation split is the last `val_fraction` of the input bytes (in input order); a
//! document that straddles the boundary is cut at a line start. Documents are separated by
//! the end-of-text token when the tokenizer has one (character vocabularies have none).

use super::shard::{token_bytes_for, Shard, ShardWriter};
use super::{Split, Tokens};
use crate::io::atomic::write_text;
use crate::tokenizer::{CharTokenizer, Tokenizer, END_OF_TEXT};
use crate::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

const BLOCK: usize = 4 << 20;
const BATCH: usize = 16 << 20;
/// Pieces are cut to about this size so a batch spreads over the cores.
const PIECE: usize = 256 << 10;

/// Where text comes from.
pub enum Source {
    /// Plain text (`.jsonl` files: one JSON object per line with a "text" field).
    File(PathBuf),
    /// Text already in memory (the embedded corpus).
    Text { name: String, text: String },
}

impl Source {
    fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Text { name, .. } => name.clone(),
        }
    }
    fn size(&self) -> Result<u64> {
        match self {
            Source::File(p) => Ok(std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len()),
            Source::Text { text, .. } => Ok(text.len() as u64),
        }
    }
    fn is_jsonl(&self) -> bool {
        matches!(self, Source::File(p) if p.extension().is_some_and(|e| e == "jsonl"))
    }
}

/// Files named on the command line; folders are searched (sorted) for .txt and .jsonl files.
pub fn collect_sources(inputs: &[PathBuf]) -> Result<Vec<Source>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|e| e == "txt" || e == "jsonl") {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            walk(p, &mut files)?;
        } else if p.exists() {
            files.push(p.clone());
        } else {
            return Err(Error::Input(format!(
                "{}: no such file or folder",
                p.display()
            )));
        }
    }
    if files.is_empty() {
        return Err(Error::Input(
            "no input files (folders are searched for .txt and .jsonl)".into(),
        ));
    }
    for f in &files {
        let len = std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
        if len == 0 {
            return Err(Error::Input(format!("{}: the file is empty", f.display())));
        }
    }
    Ok(files.into_iter().map(Source::File).collect())
}

/// A piece of a document: text, and whether the document ends with it.
struct Piece {
    text: String,
    doc_end: bool,
    /// Input bytes it stands for (for the train/validation boundary and progress).
    bytes: u64,
    /// Plain text can be cut at the boundary; a JSONL document goes whole to one side.
    splittable: bool,
}

/// The last position in `s` where a line starts with a non-space character (cutting there
/// changes no GPT-2 style pre-tokenisation), if any beyond `min`.
fn last_cut(s: &str, min: usize) -> Option<usize> {
    let b = s.as_bytes();
    (min.max(1)..b.len()).rev().find(|&i| {
        b[i - 1] == b'\n' && !(b[i] as char).is_ascii_whitespace() && s.is_char_boundary(i)
    })
}

/// Streams the pieces of every source to `f`.
fn for_each_piece(
    sources: &[Source],
    lossy: bool,
    f: &mut dyn FnMut(Piece) -> Result<()>,
) -> Result<()> {
    for src in sources {
        match src {
            Source::Text { text, .. } => {
                let mut rest: &str = text;
                while rest.len() > BLOCK {
                    let cut = last_cut(&rest[..floor_char(rest, BLOCK)], BLOCK / 2)
                        .unwrap_or_else(|| floor_char(rest, BLOCK));
                    emit_cut(&rest[..cut], false, cut as u64, f)?;
                    rest = &rest[cut..];
                }
                emit_cut(rest, true, rest.len() as u64, f)?;
            }
            Source::File(path) if src.is_jsonl() => {
                let file = File::open(path).map_err(|e| Error::io(path, e))?;
                let mut r = BufReader::with_capacity(1 << 20, file);
                let mut line = Vec::new();
                let mut n = 0usize;
                loop {
                    line.clear();
                    let got = r
                        .read_until(b'\n', &mut line)
                        .map_err(|e| Error::io(path, e))?;
                    if got == 0 {
                        break;
                    }
                    n += 1;
                    let where_ = || format!("{}:{n}", path.display());
                    let s = match std::str::from_utf8(&line) {
                        Ok(s) => s.to_string(),
                        Err(_) if lossy => String::from_utf8_lossy(&line).into_owned(),
                        Err(e) => {
                            return Err(Error::Input(format!(
                                "{}: not valid UTF-8 (at byte {} of the line)",
                                where_(),
                                e.valid_up_to()
                            )))
                        }
                    };
                    if s.trim().is_empty() {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(&s).map_err(|e| {
                        Error::Input(format!("{}: not a JSON object ({e})", where_()))
                    })?;
                    let text = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                        Error::Input(format!("{}: no \"text\" string field", where_()))
                    })?;
                    f(Piece {
                        text: text.to_string(),
                        doc_end: true,
                        bytes: got as u64,
                        splittable: false,
                    })?;
                }
            }
            Source::File(path) => {
                let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
                let mut carry: Vec<u8> = Vec::new();
                let mut offset = 0u64; // file offset of carry[0]
                let mut eof = false;
                while !eof || !carry.is_empty() {
                    if !eof {
                        let before = carry.len();
                        carry.resize(before + BLOCK, 0);
                        let got = read_full(&mut file, &mut carry[before..])
                            .map_err(|e| Error::io(path, e))?;
                        carry.truncate(before + got);
                        eof = got < BLOCK;
                    }
                    // the valid text at the front of carry (an incomplete character at the end waits)
                    let (text, used) = match std::str::from_utf8(&carry) {
                        Ok(s) => (s.to_string(), carry.len()),
                        Err(e) if e.error_len().is_none() && !eof => {
                            let v = e.valid_up_to();
                            (
                                std::str::from_utf8(&carry[..v])
                                    .expect("valid prefix")
                                    .to_string(),
                                v,
                            )
                        }
                        Err(_) if lossy => {
                            let end = if eof {
                                carry.len()
                            } else {
                                complete_prefix(&carry)
                            };
                            (String::from_utf8_lossy(&carry[..end]).into_owned(), end)
                        }
                        Err(e) => {
                            return Err(Error::Input(format!(
                            "{}: not valid UTF-8 at byte {} (use --lossy to replace invalid bytes)",
                            path.display(),
                            offset + e.valid_up_to() as u64
                        )))
                        }
                    };
                    let last = eof && used == carry.len();
                    // cut at the last line start unless this is the end of the file
                    let cut = if last {
                        text.len()
                    } else {
                        last_cut(&text, 0).unwrap_or(if used > 4 * BLOCK { text.len() } else { 0 })
                    };
                    if cut == 0 && !last {
                        continue; // no line start yet: read more
                    }
                    // bytes of carry that the piece stands for (lossy text may differ in length)
                    let consumed = if cut == text.len() { used } else { cut };
                    emit_cut(&text[..cut], last, consumed as u64, f)?;
                    carry.drain(..consumed);
                    offset += consumed as u64;
                    if last {
                        break;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Emits `text` (standing for `bytes` input bytes) as pieces of about PIECE bytes cut at line
/// starts; the last piece carries `doc_end`.
fn emit_cut(
    text: &str,
    doc_end: bool,
    bytes: u64,
    f: &mut dyn FnMut(Piece) -> Result<()>,
) -> Result<()> {
    let mut rest = text;
    let mut left = bytes;
    while rest.len() > 2 * PIECE {
        let Some(cut) = last_cut(&rest[..floor_char(rest, PIECE * 2)], PIECE) else {
            break;
        };
        let b = (cut as u64).min(left);
        f(Piece {
            text: rest[..cut].to_string(),
            doc_end: false,
            bytes: b,
            splittable: true,
        })?;
        left -= b;
        rest = &rest[cut..];
    }
    f(Piece {
        text: rest.to_string(),
        doc_end,
        bytes: left,
        splittable: true,
    })
}

/// Length of `b` without a trailing incomplete UTF-8 sequence (which the next block completes).
fn complete_prefix(b: &[u8]) -> usize {
    for i in (b.len().saturating_sub(3)..b.len()).rev() {
        let c = b[i];
        if c >= 0xC0 {
            let need = if c >= 0xF0 {
                4
            } else if c >= 0xE0 {
                3
            } else {
                2
            };
            return if b.len() - i < need { i } else { b.len() };
        }
        if c < 0x80 {
            break;
        }
    }
    b.len()
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The character vocabulary of all sources (a streaming pass).
pub fn char_vocabulary(sources: &[Source], lossy: bool) -> Result<CharTokenizer> {
    let mut set = BTreeSet::new();
    for_each_piece(sources, lossy, &mut |p| {
        set.extend(p.text.chars());
        Ok(())
    })?;
    let text: String = set.into_iter().collect();
    CharTokenizer::from_text(&text)
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Part {
    pub tokens: u64,
    pub shards: Vec<String>,
}

/// `meta.json` of a prepared folder.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub format: String,
    pub version: u32,
    pub vocab_size: usize,
    pub token_bytes: u32,
    pub val_fraction: f64,
    pub documents: u64,
    pub bytes: u64,
    pub sources: Vec<String>,
    pub train: Part,
    pub val: Part,
}

pub struct Options {
    pub val_fraction: f64,
    /// 2 (u16) or 4 (u32); None picks by vocabulary size.
    pub token_bytes: Option<u32>,
    pub shard_tokens: u64,
    pub lossy: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            val_fraction: 0.1,
            token_bytes: None,
            shard_tokens: 1 << 28,
            lossy: false,
        }
    }
}

/// Shards of one split, rolled over every `shard_tokens` tokens.
struct PartWriter {
    dir: PathBuf,
    prefix: &'static str,
    token_bytes: u32,
    vocab: usize,
    limit: u64,
    current: Option<ShardWriter>,
    done: Part,
}

impl PartWriter {
    fn write(&mut self, mut tokens: &[u32]) -> Result<()> {
        while !tokens.is_empty() {
            if self.current.is_none() {
                let name = format!("{}-{:05}.bin", self.prefix, self.done.shards.len());
                self.current = Some(ShardWriter::create(
                    &self.dir.join(&name),
                    self.token_bytes,
                    self.vocab,
                )?);
                self.done.shards.push(name);
            }
            let w = self.current.as_mut().expect("just created");
            let room = (self.limit - w.count()) as usize;
            let n = room.min(tokens.len());
            w.write(&tokens[..n])?;
            tokens = &tokens[n..];
            if w.count() >= self.limit {
                self.done.tokens += self.current.take().expect("open").finish()?;
            }
        }
        Ok(())
    }
    fn finish(mut self) -> Result<Part> {
        if let Some(w) = self.current.take() {
            self.done.tokens += w.finish()?;
        }
        Ok(self.done)
    }
}

/// Tokenises `sources` into shards in `out`, calling `progress(bytes done, bytes in all)`.
pub fn prepare(
    sources: &[Source],
    tok: &Tokenizer,
    out: &Path,
    opts: &Options,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Meta> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::Input(format!(
            "validation fraction {} must be in [0, 1)",
            opts.val_fraction
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // a folder being (re)written is not a prepared folder until meta.json appears
    let meta_path = out.join("meta.json");
    if meta_path.exists() {
        std::fs::remove_file(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
    }
    let vocab = tok.vocab_size();
    let token_bytes = opts.token_bytes.unwrap_or(token_bytes_for(vocab));
    if token_bytes == 2 && vocab > 1 << 16 {
        return Err(Error::Input(format!(
            "the tokenizer has {vocab} tokens, too many for u16 shards (at most 65536); use u32"
        )));
    }
    let total: u64 = sources.iter().map(|s| s.size()).sum::<Result<u64>>()?;
    let boundary = total - (total as f64 * opts.val_fraction) as u64;
    let eot = tok.token_to_id(END_OF_TEXT);
    let char_level = matches!(tok, Tokenizer::Char(_));
    let mk = |prefix| PartWriter {
        dir: out.to_path_buf(),
        prefix,
        token_bytes,
        vocab,
        limit: opts.shard_tokens.max(1),
        current: None,
        done: Part {
            tokens: 0,
            shards: vec![],
        },
    };
    let (mut train, mut val) = (mk("train"), mk("val"));
    let mut batch: Vec<(Piece, bool)> = Vec::new(); // (piece, goes to validation)
    let mut batch_bytes = 0usize;
    let mut done = 0u64;
    let mut documents = 0u64;
    let flush = |batch: &mut Vec<(Piece, bool)>,
                 train: &mut PartWriter,
                 val: &mut PartWriter|
     -> Result<()> {
        let encoded: Vec<Result<Vec<u32>>> = batch
            .par_iter()
            .map(|(p, _)| tok.encode_plain(&p.text))
            .collect();
        for ((p, to_val), ids) in batch.iter().zip(encoded) {
            let w = if *to_val { &mut *val } else { &mut *train };
            w.write(&ids?)?;
            if p.doc_end {
                if let Some(e) = eot {
                    w.write(&[e])?;
                }
            }
        }
        batch.clear();
        Ok(())
    };
    for_each_piece(sources, opts.lossy, &mut |p: Piece| {
        if p.doc_end {
            documents += 1;
        }
        let mut pieces = vec![];
        if done >= boundary {
            pieces.push((p, true));
        } else if p.splittable && done + p.bytes > boundary {
            // cut at the boundary: exactly for characters, at a line start otherwise
            let at = floor_char(&p.text, ((boundary - done) as usize).min(p.text.len()));
            let at = if char_level {
                at
            } else {
                last_cut(&p.text[..at], 0).unwrap_or(at)
            };
            let (a, b) = p.text.split_at(at);
            pieces.push((
                Piece {
                    text: a.to_string(),
                    doc_end: false,
                    bytes: a.len() as u64,
                    splittable: true,
                },
                false,
            ));
            pieces.push((
                Piece {
                    text: b.to_string(),
                    doc_end: p.doc_end,
                    bytes: b.len() as u64,
                    splittable: true,
                },
                true,
            ));
        } else {
            pieces.push((p, false));
        }
        for (piece, to_val) in pieces {
            done += piece.bytes;
            batch_bytes += piece.text.len();
            batch.push((piece, to_val));
        }
        if batch_bytes >= BATCH {
            flush(&mut batch, &mut train, &mut val)?;
            batch_bytes = 0;
        }
        progress(done.min(total), total);
        Ok(())
    })?;
    flush(&mut batch, &mut train, &mut val)?;
    let meta = Meta {
        format: "quill-shards".into(),
        version: 1,
        vocab_size: vocab,
        token_bytes,
        val_fraction: opts.val_fraction,
        documents,
        bytes: total,
        sources: sources.iter().map(Source::name).collect(),
        train: train.finish()?,
        val: val.finish()?,
    };
    write_text(&out.join("tokenizer.json"), &tok.to_json()?)?;
    write_text(
        &meta_path,
        &(serde_json::to_string_pretty(&meta).expect("meta serializes") + "\n"),
    )?;
    Ok(meta)
}

/// Opens a prepared folder: its metadata and the train/validation token sequences.
pub fn load(dir: &Path) -> Result<(Meta, Split)> {
    let meta_path = dir.join("meta.json");
    if !meta_path.is_file() {
        return Err(Error::Input(format!(
            "{}: not a prepared data folder (no meta.json; was `quill prepare` interrupted?)",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
    let meta: Meta = serde_json::from_str(&text)
        .map_err(|e| Error::format(&meta_path, format!("bad meta.json: {e}")))?;
    let open = |part: &Part| -> Result<Tokens> {
        let mut shards = Vec::new();
        let mut count = 0u64;
        for name in &part.shards {
            let s = Shard::open(&crate::io::file_inside(dir, name, "meta.json")?)?;
            if s.vocab_size != meta.vocab_size {
                return Err(Error::format(
                    dir.join(name),
                    "shard vocabulary differs from meta.json",
                ));
            }
            count += s.len() as u64;
            shards.push(s);
        }
        if count != part.tokens {
            return Err(Error::format(
                &meta_path,
                "the shards hold a different number of tokens than meta.json says",
            ));
        }
        Ok(Tokens::from_shards(shards))
    };
    let split = Split {
        train: open(&meta.train)?,
        val: open(&meta.val)?,
    };
    Ok((meta, split))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("quill-prep-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn all(t: &Tokens) -> Vec<u32> {
        let mut v = vec![0; t.len()];
        t.read(0, &mut v);
        v
    }

    #[test]
    fn char_shards_equal_in_memory_split() {
        let d = tmp("char");
        let text: String = (0..5000).map(|i| format!("line {i}: ä∑\n")).collect();
        std::fs::write(d.join("a.txt"), &text).unwrap();
        let sources = collect_sources(&[d.join("a.txt")]).unwrap();
        let tok = Tokenizer::Char(char_vocabulary(&sources, false).unwrap());
        let opts = Options {
            shard_tokens: 10_000,
            ..Default::default()
        };
        let meta = prepare(&sources, &tok, &d.join("out"), &opts, &mut |_, _| {}).unwrap();
        assert!(meta.train.shards.len() > 3, "rolled over shards");
        let (_, split) = load(&d.join("out")).unwrap();
        let ids = tok.encode(&text).unwrap();
        let joined: Vec<u32> = all(&split.train)
            .into_iter()
            .chain(all(&split.val))
            .collect();
        assert_eq!(joined, ids, "shards hold exactly the tokens of the text");
        // the boundary is the last 10% of the bytes, at a character boundary
        let b = text.len() - (text.len() as f64 * 0.1) as usize;
        let b = floor_char(&text, b);
        assert_eq!(split.train.len(), text[..b].chars().count());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bpe_jsonl_and_folders_with_end_of_text_between_documents() {
        let d = tmp("jsonl");
        std::fs::create_dir_all(d.join("in/sub")).unwrap();
        std::fs::write(
            d.join("in/a.jsonl"),
            "{\"text\": \"Hello world\"}\n\n{\"text\": \"second doc\"}\n",
        )
        .unwrap();
        std::fs::write(d.join("in/sub/b.txt"), "plain file\n").unwrap();
        std::fs::write(d.join("in/ignored.csv"), "x").unwrap();
        let sources = collect_sources(&[d.join("in")]).unwrap();
        assert_eq!(sources.len(), 2);
        let tok = Tokenizer::from_spec("gpt2").unwrap();
        let opts = Options {
            val_fraction: 0.0,
            ..Default::default()
        };
        let meta = prepare(&sources, &tok, &d.join("out"), &opts, &mut |_, _| {}).unwrap();
        assert_eq!((meta.documents, meta.token_bytes), (3, 2));
        let (_, split) = load(&d.join("out")).unwrap();
        let mut want = tok.encode("Hello world").unwrap();
        want.push(50256);
        want.extend(tok.encode("second doc").unwrap());
        want.push(50256);
        want.extend(tok.encode("plain file\n").unwrap());
        want.push(50256);
        assert_eq!(all(&split.train), want);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_inputs_name_the_file_and_place() {
        let d = tmp("bad");
        std::fs::write(d.join("x.jsonl"), "{\"text\": \"ok\"}\nnot json\n").unwrap();
        std::fs::write(d.join("y.jsonl"), "{\"text\": \"ok\"}\n{\"body\": 1}\n").unwrap();
        std::fs::write(d.join("z.txt"), b"abc\n\xffdef").unwrap();
        std::fs::write(d.join("e.txt"), b"").unwrap();
        let tok = Tokenizer::from_spec("gpt2").unwrap();
        let run = |f: &str| {
            let s = collect_sources(&[d.join(f)])?;
            prepare(
                &s,
                &tok,
                &d.join("out"),
                &Options::default(),
                &mut |_, _| {},
            )
        };
        let e = run("x.jsonl").err().unwrap().to_string();
        assert!(e.contains("x.jsonl:2") && e.contains("JSON"), "{e}");
        let e = run("y.jsonl").err().unwrap().to_string();
        assert!(e.contains("y.jsonl:2") && e.contains("text"), "{e}");
        let e = run("z.txt").err().unwrap().to_string();
        assert!(e.contains("z.txt") && e.contains("byte 4"), "{e}");
        assert!(run("e.txt").err().unwrap().to_string().contains("empty"));
        assert!(run("nope.txt").is_err());
        // nothing that looks complete is left behind by a failed run
        assert!(!d.join("out/meta.json").exists());
        assert!(load(&d.join("out")).is_err());
        // --lossy replaces the invalid byte
        let s = collect_sources(&[d.join("z.txt")]).unwrap();
        let opts = Options {
            lossy: true,
            val_fraction: 0.0,
            ..Default::default()
        };
        prepare(&s, &tok, &d.join("out"), &opts, &mut |_, _| {}).unwrap();
        let (_, split) = load(&d.join("out")).unwrap();
        let mut v = all(&split.train);
        v.pop();
        assert_eq!(tok.decode(&v).unwrap(), "abc\n\u{fffd}def");
        // a vocabulary too large for u16
        let opts = Options {
            token_bytes: Some(2),
            ..Default::default()
        };
        let big = Tokenizer::from_json_str(&big_vocab(), Path::new("big")).unwrap();
        assert!(prepare(&s, &big, &d.join("o2"), &opts, &mut |_, _| {})
            .err()
            .unwrap()
            .to_string()
            .contains("u16"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pieces_cut_on_character_boundaries() {
        // multi-byte characters straddle every power-of-two offset
        let line = "ab\u{e2}\u{20ac}\u{1f980}c\n";
        let text: String = line.repeat(3 * (PIECE + BLOCK) / line.len());
        let src = [Source::Text {
            name: "t".into(),
            text: text.clone(),
        }];
        let mut joined = String::new();
        let mut bytes = 0;
        for_each_piece(&src, false, &mut |p| {
            joined.push_str(&p.text);
            bytes += p.bytes;
            Ok(())
        })
        .unwrap();
        assert_eq!((joined.as_str(), bytes), (text.as_str(), text.len() as u64));
        let d = tmp("cuts");
        std::fs::write(d.join("t.txt"), &text).unwrap();
        let mut joined = String::new();
        for_each_piece(
            &collect_sources(&[d.join("t.txt")]).unwrap(),
            false,
            &mut |p| {
                joined.push_str(&p.text);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(joined, text);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A WordLevel tokenizer with 70,000 entries.
    fn big_vocab() -> String {
        let vocab: serde_json::Map<String, serde_json::Value> = (0..70_000)
            .map(|i| (format!("w{i}"), serde_json::Value::from(i)))
            .collect();
        serde_json::json!({
            "version": "1.0", "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
        })
        .to_string()
    }
}
