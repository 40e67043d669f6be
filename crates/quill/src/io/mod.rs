//! Files: atomic writes, safetensors, Hugging Face model folders, llama2.c checkpoints. The
//! model room imports none of this: loaders build models through their public constructors.

pub mod atomic;
pub mod hf;
pub mod llama2c;
pub mod safetensors;

pub use atomic::write_atomic;
