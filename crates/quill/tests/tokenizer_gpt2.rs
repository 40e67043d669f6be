//! OpenAI's GPT-2 tokenizer: reference encodings made by tiktoken from OpenAI's original files
//! (tests/fixtures/gpt2-tokenizer/reference_encodings.json) are reproduced exactly, and
//! decode(encode(x)) == x for arbitrary text.

use quill::rng::Rng;
use quill::tokenizer::{StreamDecoder, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;

fn reference() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gpt2-tokenizer/reference_encodings.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn reproduces_every_reference_encoding() {
    let tok = Tokenizer::from_spec("gpt2").unwrap();
    let r = reference();
    assert_eq!(tok.vocab_size() as u64, r["vocab_size"].as_u64().unwrap());
    let cases = r["cases"].as_array().unwrap();
    assert!(cases.len() >= 17);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids"]);
        assert_eq!(
            tok.encode_plain(text).unwrap(),
            want,
            "plain encoding of {:?}",
            c["name"]
        );
        // with special-token recognition (the Hugging Face behaviour)
        let want_special = c.get("ids_special").map(ids).unwrap_or(want.clone());
        assert_eq!(
            tok.encode(text).unwrap(),
            want_special,
            "encoding of {:?}",
            c["name"]
        );
        assert_eq!(tok.decode(&want).unwrap(), text);
    }
}

/// Random text from pieces that stress byte-level BPE: ASCII, whitespace runs, control
/// characters, accents and combining marks, CJK, emoji with modifiers and joiners, and
/// characters the GPT-2 pattern treats specially (U+FEFF, U+200B, apostrophes).
fn random_text(rng: &mut Rng) -> String {
    const PIECES: &[&str] = &[
        "a",
        "Z",
        "hello",
        " world",
        "'s",
        "'ll",
        "don't",
        "  ",
        "   ",
        "\t",
        "\n",
        "\r\n",
        "\u{0}",
        "\u{1b}",
        "\u{7f}",
        "é",
        "e\u{301}",
        "ß",
        "Ω",
        "こんにちは",
        "世界",
        "한국어",
        "😀",
        "👍🏽",
        "👨‍👩‍👧",
        "🦀",
        "\u{feff}",
        "\u{200b}",
        "\u{a0}",
        "123",
        "3.14",
        "-",
        "!!",
        "...",
        "<|endoftext|>",
        "<|",
        "|>",
        "\u{10ffff}",
        "\u{fffd}",
        "ǅ",
        "ﬁ",
        "Ⅻ",
        "٣",
    ];
    let n = rng.below(12);
    let mut s = String::new();
    for _ in 0..n {
        if rng.below(4) == 0 {
            // any Unicode scalar value
            let c = loop {
                if let Some(c) = char::from_u32(rng.below(0x11_0000) as u32) {
                    break c;
                }
            };
            s.push(c);
        } else {
            s.push_str(PIECES[rng.below(PIECES.len())]);
        }
    }
    s
}

#[test]
fn decode_of_encode_is_the_identity_on_arbitrary_text() {
    let tok = Tokenizer::from_spec("gpt2").unwrap();
    let mut rng = Rng::new(2024);
    for i in 0..1000 {
        let text = random_text(&mut rng);
        for ids in [tok.encode(&text).unwrap(), tok.encode_plain(&text).unwrap()] {
            assert_eq!(tok.decode(&ids).unwrap(), text, "case {i}: {text:?}");
        }
        // streaming decode gives the same text, piece by piece
        let ids = tok.encode_plain(&text).unwrap();
        let mut stream = StreamDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&stream.push(&tok, id).unwrap());
        }
        out.push_str(&stream.finish(&tok).unwrap());
        assert_eq!(out, text, "stream case {i}");
    }
}
