//! Files: atomic writes, safetensors, Hugging Face model folders, GGUF files, llama2.c
//! checkpoints. The
//! model room imports none of this: loaders build models through their public constructors.

pub mod atomic;
pub mod generation;
pub mod gguf;
pub mod hf;
pub mod llama2c;
pub mod open;
pub mod opened;
pub mod paths;
pub mod peft;
pub mod safetensors;

pub use atomic::write_atomic;
pub use open::{adapt, load_model, load_model_dequantized, open, open_adapted};
pub use opened::Opened;
pub use paths::file_inside;
