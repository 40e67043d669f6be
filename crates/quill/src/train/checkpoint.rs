//! Checkpoints. The output folder is a Hugging Face model folder (`config.json`,
//! `model.safetensors`, `tokenizer.json`) plus `training_state.safetensors`, which holds the
//! parameters, both AdamW moments and the trainer state (step, data-sampler RNG, ...) in one
//! file. Each file is written atomically, and resuming reads only `training_state`, so a run
//! killed at any moment resumes from one consistent step.

use crate::io::safetensors::{write_f32, SafetensorsFile};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

pub const TRAINING_STATE_FILE: &str = "training_state.safetensors";
const STATE_KEY: &str = "trainer_state";

pub struct TrainingState {
    pub params: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    /// The trainer's own state, as JSON.
    pub state_json: String,
}

pub fn save(
    dir: &Path,
    params: &[f32],
    exp_avg: &[f32],
    exp_avg_sq: &[f32],
    state_json: &str,
) -> Result<()> {
    let n = [params.len()];
    let mut meta = BTreeMap::new();
    meta.insert(STATE_KEY.to_string(), state_json.to_string());
    write_f32(
        &dir.join(TRAINING_STATE_FILE),
        &[
            ("params", &n, params),
            ("exp_avg", &n, exp_avg),
            ("exp_avg_sq", &n, exp_avg_sq),
        ],
        &meta,
    )
}

pub fn load(dir: &Path, n_params: usize) -> Result<TrainingState> {
    let path = dir.join(TRAINING_STATE_FILE);
    if !path.is_file() {
        return Err(Error::Input(format!(
            "{}: no {TRAINING_STATE_FILE} to resume from (was this folder written by `quill train`?)",
            dir.display()
        )));
    }
    let f = SafetensorsFile::open(&path)?;
    let state_json = f
        .metadata()?
        .remove(STATE_KEY)
        .ok_or_else(|| Error::format(&path, "no trainer state in the header"))?;
    let read = |name: &str| -> Result<Vec<f32>> {
        let mut v = vec![0.0; n_params];
        f.read_into(name, &[n_params], &mut v)?;
        Ok(v)
    };
    Ok(TrainingState {
        params: read("params")?,
        exp_avg: read("exp_avg")?,
        exp_avg_sq: read("exp_avg_sq")?,
        state_json,
    })
}
