//! Training: AdamW, the learning-rate schedule, the loop with validation and samples,
//! checkpoints, metrics and the loss plot; data-parallel runs over MPI.

pub mod checkpoint;
pub mod dist;
pub mod optimizer;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use optimizer::AdamW;
pub use trainer::{Event, Metrics, RunOptions, TrainConfig, Trainer};
