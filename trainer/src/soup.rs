//! `trainer soup`: the uniform or weighted average of model checkpoints of one architecture (a
//! "model soup", as the published `-ft-soup` models are averages of fine-tunes). Inputs are any
//! weights files the trainer reads (ours, OpenCLIP's `.bin` / `.safetensors`, open_clip_train's
//! `epoch_N.pt`); the output is an OpenCLIP-compatible `.safetensors` model file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use crate::config::ConfigError;
use crate::model::{read_state_dict, without_ddp_prefix};

/// The weights of each input (unset: uniform), checked and normalized to sum to 1.
pub fn normalized_weights(inputs: usize, weights: Option<&[f64]>) -> Result<Vec<f64>, ConfigError> {
    let err = |message: String| ConfigError { file: "<command line>".into(), message };
    let w: Vec<f64> = match weights {
        None => vec![1.0; inputs],
        Some(w) if w.len() != inputs => {
            return Err(err(format!("--weights: {} weights for {inputs} checkpoints", w.len())))
        }
        Some(w) => w.to_vec(),
    };
    if let Some(bad) = w.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
        return Err(err(format!("--weights: {bad} is not a number >= 0")));
    }
    let sum: f64 = w.iter().sum();
    if sum <= 0.0 {
        return Err(err("--weights: they sum to 0".into()));
    }
    Ok(w.iter().map(|x| x / sum).collect())
}

/// The state dict of one input, keys without a DDP `module.` prefix, sorted.
fn state_dict(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let named = read_state_dict(path)?;
    Ok(named.into_iter().map(|(k, t)| (without_ddp_prefix(&k).to_string(), t)).collect())
}

/// Average `inputs` with `weights` (one per input, as given; unset: uniform) into `out`. Floating
/// tensors are averaged in f64 and stored as fp32; any other tensor must be equal in every input.
/// Inputs whose keys or shapes differ are refused, naming the first difference (exit status 2).
pub fn soup(inputs: &[PathBuf], weights: Option<&[f64]>, out: &Path) -> Result<()> {
    if inputs.len() < 2 {
        anyhow::bail!(ConfigError {
            file: "<command line>".into(),
            message: "soup: give at least two checkpoints".into()
        });
    }
    let w = normalized_weights(inputs.len(), weights)?;
    let first = state_dict(&inputs[0])?;
    let mut acc: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, t) in &first {
        let v = match t.is_floating_point() {
            true => t.to_kind(Kind::Double) * w[0],
            false => t.shallow_clone(),
        };
        acc.insert(k.clone(), v);
    }
    for (path, &wi) in inputs.iter().zip(&w).skip(1) {
        let next = state_dict(path)?;
        let mismatch = |message: String| ConfigError {
            file: path.display().to_string(),
            message: format!("not the architecture of {}: {message}", inputs[0].display()),
        };
        let keys_a: Vec<&String> = first.keys().collect();
        let keys_b: Vec<&String> = next.keys().collect();
        if keys_a != keys_b {
            let only_a = keys_a.iter().find(|k| !next.contains_key(**k));
            let only_b = keys_b.iter().find(|k| !first.contains_key(**k));
            let message = match (only_a, only_b) {
                (Some(k), _) => format!("key `{k}` is missing"),
                (None, Some(k)) => format!("key `{k}` is not in the first"),
                (None, None) => "the keys differ".into(),
            };
            anyhow::bail!(mismatch(message));
        }
        for (k, t) in &next {
            let a = &first[k];
            if a.size() != t.size() {
                anyhow::bail!(mismatch(format!("key `{k}` has shape {:?}, the first {:?}", t.size(), a.size())));
            }
            let sum = acc.get_mut(k).expect("same keys");
            if a.is_floating_point() {
                *sum += t.to_kind(Kind::Double) * wi;
            } else if !a.equal(t) {
                anyhow::bail!(mismatch(format!(
                    "key `{k}` is a {:?} tensor that differs (only floats are averaged)",
                    a.kind()
                )));
            }
        }
    }
    let named: Vec<(String, Tensor)> = acc
        .into_iter()
        .map(|(k, t)| {
            let t = if t.is_floating_point() { t.to_kind(Kind::Float) } else { t };
            (k, t)
        })
        .collect();
    let recipe: Vec<String> = inputs.iter().zip(&w).map(|(p, wi)| format!("{wi} x {}", p.display())).collect();
    let meta = BTreeMap::from([("soup".to_string(), recipe.join(" + "))]);
    let bytes = crate::checkpoint::serialize(&named, &meta)?;
    std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("ferroclip: wrote {} ({} tensors): {}", out.display(), named.len(), recipe.join(" + "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_checked_and_normalized() {
        assert_eq!(normalized_weights(2, None).unwrap(), [0.5, 0.5]);
        assert_eq!(normalized_weights(2, Some(&[3.0, 1.0])).unwrap(), [0.75, 0.25]);
        assert!(normalized_weights(3, Some(&[1.0, 1.0])).unwrap_err().message.contains("2 weights for 3"));
        assert!(normalized_weights(2, Some(&[1.0, -1.0])).is_err());
        assert!(normalized_weights(2, Some(&[0.0, 0.0])).is_err());
        assert!(normalized_weights(2, Some(&[f64::NAN, 1.0])).is_err());
    }

    fn write(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let path = dir.join(name);
        let named: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| (k.to_string(), t.shallow_clone())).collect();
        std::fs::write(&path, crate::checkpoint::serialize(&named, &BTreeMap::new()).unwrap()).unwrap();
        path
    }

    #[test]
    fn averages_with_weights_and_refuses_another_architecture() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            dir.path(),
            "a.safetensors",
            &[("w", Tensor::from_slice(&[1.0f32, 2.0])), ("n", Tensor::from_slice(&[3i64]))],
        );
        let b = write(
            dir.path(),
            "b.safetensors",
            &[("w", Tensor::from_slice(&[3.0f32, 6.0])), ("n", Tensor::from_slice(&[3i64]))],
        );
        let out = dir.path().join("s.safetensors");
        soup(&[a.clone(), b.clone()], Some(&[1.0, 3.0]), &out).unwrap();
        let got = state_dict(&out).unwrap();
        assert_eq!(Vec::<f32>::try_from(&got["w"]).unwrap(), [2.5, 5.0]);
        assert_eq!(Vec::<i64>::try_from(&got["n"]).unwrap(), [3]);
        let c = write(
            dir.path(),
            "c.safetensors",
            &[("w", Tensor::from_slice(&[1.0f32, 2.0, 3.0])), ("n", Tensor::from_slice(&[3i64]))],
        );
        let e = soup(&[a.clone(), c], None, &out).unwrap_err();
        let ce = e.downcast_ref::<ConfigError>().unwrap();
        assert!(ce.file.ends_with("c.safetensors") && ce.message.contains("key `w`"), "{ce}");
        let d = write(
            dir.path(),
            "d.safetensors",
            &[("w", Tensor::from_slice(&[1.0f32, 2.0])), ("m", Tensor::from_slice(&[3i64]))],
        );
        let e = soup(&[a, d], None, &out).unwrap_err().to_string();
        assert!(e.contains("key `n` is missing"), "{e}");
    }
}
