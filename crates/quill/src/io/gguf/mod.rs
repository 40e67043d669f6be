//! GGUF files (llama.cpp's format): the container ([`reader`]), and models, tokenizers and
//! chat templates opened from it ([`load`]).

pub mod export;
pub mod load;
pub mod reader;
pub mod write;

pub use reader::{Array, Gguf, TensorInfo, Value, ValueType};
