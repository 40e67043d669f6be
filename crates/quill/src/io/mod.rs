//! Files: atomic writes, safetensors, Hugging Face model folders.

pub mod atomic;
pub mod hf;
pub mod safetensors;

pub use atomic::write_atomic;
