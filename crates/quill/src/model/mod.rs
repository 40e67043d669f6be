//! Models: the configurations (mirrors of HF `config.json`), the flat parameter store with
//! named views under the HF weight names, the weights' storage, and the one decoder whose
//! parts each architecture chooses.
//!
//! - `decoder.rs`: [`Model`], the parts (norm, positions, MLP, heads) and its weights
//! - `training.rs`: the training forward and backward passes over a batch
//! - `inference.rs`: one step over segments against KV caches (prompts, decoding, batches)
//! - `weight.rs`: [`Weight`] (where a matrix lives) and [`Linear`] (one projection)
//! - `gpt2.rs`, `llama.rs`: each architecture's weights under its Hugging Face names

pub mod beside;
pub mod config;
pub mod decoder;
pub mod gpt2;
pub mod inference;
pub mod llama;
pub mod llama_config;
pub mod lora;
pub mod params;
pub mod training;
pub mod weight;

pub use config::Gpt2Config;
pub use decoder::{Config, Model, SUPPORTED_ARCHITECTURES};
pub use inference::{Cache, Rows, Scratch, Segment};
pub use llama_config::LlamaConfig;
pub use params::{ParamLayout, TensorSpec, View};
pub use training::{Activations, Batch};
pub use weight::{Linear, Weight};

impl Model {
    /// A model of this configuration with every parameter zero (see [`Model::init`]): the
    /// architecture's file lays its weights out under its Hugging Face names.
    pub fn new(config: Config) -> crate::Result<Model> {
        match config.parameter_count() {
            Some(n) if n <= decoder::MAX_PARAMETERS => {}
            n => {
                return Err(crate::Error::Input(format!(
                    "a model of {} parameters is larger than quill's limit of 2^36",
                    n.map_or("more than 2^64".into(), |n| n.to_string())
                )))
            }
        }
        match config {
            Config::Gpt2(c) => gpt2::build(c),
            Config::Llama(c) => llama::build(c),
        }
    }
}
