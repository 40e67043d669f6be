//! [`Opened`]: a model ready for inference with everything that comes with it.

use super::generation::GenerationConfig;
use crate::chat::ChatTemplate;
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// A model opened for inference: its weights, tokenizer, chat template (if any), sampling
/// defaults and the ids that end a reply. [`super::open`] opens any of the formats quill reads.
pub struct Opened {
    pub model: Model,
    pub tok: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub gen: GenerationConfig,
    pub eos: Vec<u32>,
}
