//! Tokenizers: text <-> token ids.
//!
//! - [`CharTokenizer`]: character level, built from a corpus (quill's default for training).
//! - Any Hugging Face `tokenizer.json` (byte-level BPE as GPT-2, Llama 3, Qwen2; SentencePiece
//!   style BPE; with added and special tokens), through the `tokenizers` crate.
//!
//! - llama2.c's `tokenizer.bin` ([`Llama2cTokenizer`]), for llama2.c checkpoints.
//!
//! [`Tokenizer`] is any of them; `Tokenizer::load` picks by the file's content.

mod any;
mod bpe;
mod bytebpe;
mod char;
pub mod llama2c;
mod stream;

pub use self::char::CharTokenizer;
pub use any::{HfTokenizer, Tokenizer, GPT2_TOKENIZER_JSON};
pub use bpe::{train_byte_level_bpe, END_OF_TEXT};
pub use llama2c::Llama2cTokenizer;
pub use stream::StreamDecoder;
