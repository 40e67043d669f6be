//! Sampling: the one place where logits become probabilities. A [`Sampler`] is the logits
//! processor every command and the server use, in one written order:
//!
//! ```text
//! penalties (repetition, presence, frequency) -> temperature -> softmax
//!     -> top-k -> top-p -> min-p -> draw
//! ```
//!
//! Each draw returns the token and its log-probability under the model; the distribution
//! before the cut ([`Sampler::distribution`]) and after it ([`Sampler::kept`]) stay readable
//! for the explain view and the tests. [`log_softmax_at`], [`top_logprobs`] and [`score`]
//! give the model's own log-probabilities (no processing), for logprobs and scoring.
//! Temperature 0 means greedy: the most likely token after the penalties.

mod beam;
mod generate;
mod sampler;
mod score;
pub use beam::{beam_search, BeamSearch};
pub use generate::{generate, GenerateEvent, Stop};
pub use sampler::{
    argmax, log_softmax_at, logsumexp, top_logprobs, Draw, Sampler, SamplingParams, Top,
};
pub use score::{perplexity, score, Perplexity, Score};
