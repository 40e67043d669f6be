//! Quill: a transformer language model system written from first principles.
//!
//! The data flow reads like the explainer it implements:
//!
//! ```text
//! text -> tokenizer.encode -> token ids
//!      -> model.forward: embed -> [norm -> attention -> add -> norm -> mlp -> add] x L -> norm -> logits
//!      -> train:    cross_entropy(logits, next ids) -> model.backward -> AdamW step
//!      -> generate: softmax(logits / temperature) -> top-k / top-p cut -> draw -> id -> decode
//! ```
//!
//! Rooms: [`kernels`] (one operation per file, forward/backward pairs over flat f32 buffers),
//! [`model`] (configuration, flat parameter store, GPT-2), [`io`] (Hugging Face folders,
//! safetensors, atomic writes), [`tokenizer`], [`data`], [`train`], [`sample`].

pub mod bench;
pub mod chat;
pub mod data;
pub mod error;
pub mod eval;
pub mod explain;
pub mod io;
pub mod kernels;
pub mod model;
pub mod rng;
pub mod sample;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
