//! What inference adds beside a projection's weights: LoRA adapters left unmerged (a base
//! that stays quantized). The model holds them behind this trait so that the decoder does
//! not depend on the adapters' module (model/lora.rs implements it).

/// A projection of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projection {
    /// q | k | v, fused.
    Qkv,
    /// The attention's output.
    O,
    /// gate | up (or GPT-2's c_fc), fused.
    Up,
    /// The MLP's output.
    Down,
}

pub trait Beside: Send + Sync {
    /// Adds into y [n, width] (the projection's output, rows of x [n, in]) what sits beside
    /// projection `at.1` of layer `at.0`; `scratch` is for its products (grown as needed).
    fn add(&self, at: (usize, Projection), x: &[f32], y: &mut [f32], scratch: &mut Vec<f32>);
}
