//! This site's SCAFFOLD control variate c_i (Karimireddy et al. 2020), kept
//! per training under `state_dir` so that it survives rounds and restarts:
//! `state_dir/<training>/scaffold-control.safetensors`, the model's layout.
//!
//! It is written (atomically, fsynced) once the coordinator has acknowledged
//! the update carrying its change: the server's c then includes that change.
//! A daemon killed between the acknowledgement and the write starts the next
//! round from the c_i before (the server's c is then off by that one change,
//! weighted by this site's share, until the site's next update).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sangsaeng_common::learning::model::TensorSpec;
use sangsaeng_common::transfer::weights;

use crate::error::{ParticipantError, Result};

const FILE_NAME: &str = "scaffold-control.safetensors";

/// Where the site keeps `training`'s control variate; refused without a
/// `state_dir` (a SCAFFOLD plan is then declined, with the key to set).
pub fn control_path(state_dir: Option<&Path>, training: &str) -> Result<PathBuf> {
    let dir = state_dir.ok_or_else(|| {
        ParticipantError::Config(
            "the plan trains with SCAFFOLD (aggregation.strategy = \"scaffold\"), which keeps a control variate at the site between rounds: set state_dir in the participant's config file (or --state-dir)".into(),
        )
    })?;
    Ok(training_dir(dir, training)?.join(FILE_NAME))
}

/// `dir/<training>`, for a training id that is a plain folder name (it comes
/// from the coordinator, so it is checked before it names a path).
pub fn training_dir(dir: &Path, training: &str) -> Result<PathBuf> {
    if training.is_empty() || training.contains(['/', '\\']) || training.starts_with('.') {
        return Err(ParticipantError::Config(format!(
            "training id {training:?} cannot name a folder under {}",
            dir.display()
        )));
    }
    Ok(dir.join(training))
}

/// The site's c_i: zero before its first SCAFFOLD round of the training.
pub fn load(path: &Path, layout: &[TensorSpec]) -> Result<Vec<f32>> {
    if !path.exists() {
        let n = layout
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        return Ok(vec![0.0; n]);
    }
    Ok(weights::load_safetensors(path, layout)?)
}

/// Keeps c_i after `round`'s update was acknowledged.
pub fn save(path: &Path, layout: &[TensorSpec], control: &[f32], round: u32) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| sangsaeng_common::Error::io(dir, e))?;
    }
    let meta = HashMap::from([("round".to_string(), round.to_string())]);
    weights::save_safetensors(path, layout, control, meta)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_control_variate_survives_a_restart_and_starts_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let layout = vec![TensorSpec {
            name: "w".into(),
            shape: vec![3],
        }];
        let p = control_path(Some(dir.path()), "t-1").unwrap();
        assert_eq!(load(&p, &layout).unwrap(), vec![0.0; 3]);
        save(&p, &layout, &[1.0, -2.0, 0.5], 4).unwrap();
        assert_eq!(load(&p, &layout).unwrap(), vec![1.0, -2.0, 0.5]);
        assert!(
            control_path(None, "t-1")
                .unwrap_err()
                .to_string()
                .contains("state_dir")
        );
        assert!(control_path(Some(dir.path()), "../x").is_err());
    }
}
