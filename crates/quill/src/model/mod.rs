//! Models: the configuration (mirrors HF `config.json`), the flat parameter store with
//! named views under the HF weight names, and the architectures.

pub mod any;
pub mod config;
pub mod gpt2;
pub mod llama;
pub mod llama2c;
pub mod llama_config;
pub mod params;

pub use any::{Acts, BatchScratch, Cache, Model, SUPPORTED_ARCHITECTURES};
pub use config::Gpt2Config;
pub use gpt2::{Activations, Gpt2, KvCache};
pub use llama::{Llama, LlamaActivations, LlamaCache};
pub use llama_config::LlamaConfig;
pub use params::{ParamLayout, TensorSpec, View};
