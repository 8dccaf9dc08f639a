//! Choosing the compute device for this rank, and refusing to fall back to the CPU silently when the
//! launcher gave this job GPUs that libtorch cannot see.

use tch::Device;

/// The environment variables through which a launcher says it allocated GPUs to this job or task.
pub const GPU_ALLOCATION_VARS: [&str; 7] = [
    "CUDA_VISIBLE_DEVICES",
    "SLURM_GPUS",
    "SLURM_GPUS_ON_NODE",
    "SLURM_GPUS_PER_NODE",
    "SLURM_GPUS_PER_TASK",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
];

/// `train.device`: where this rank computes. Every command that runs a model resolves it here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceConfig {
    /// This rank's GPU if libtorch sees one; the CPU when the job has none; an error when the
    /// launcher allocated GPUs that libtorch does not see ([`auto`]).
    Auto,
    Cpu,
    /// This rank's GPU; an error without a usable one.
    Cuda,
}

impl DeviceConfig {
    /// The device of the rank with `local_rank` on its node.
    pub fn resolve(self, local_rank: usize) -> Result<Device, String> {
        let cuda = tch::Cuda::is_available();
        match self {
            DeviceConfig::Cpu => Ok(Device::Cpu),
            DeviceConfig::Cuda if !cuda => {
                Err("train.device = \"cuda\", but libtorch sees no CUDA device (a CPU-only \
                 torch wheel, no driver, or CUDA_VISIBLE_DEVICES empty)"
                    .into())
            }
            DeviceConfig::Cuda => Ok(local_gpu(local_rank)),
            DeviceConfig::Auto => auto(local_rank, cuda, |var| std::env::var(var).ok()),
        }
    }
}

/// The GPU of `local_rank`: ranks on a node share its visible GPUs round-robin.
fn local_gpu(local_rank: usize) -> Device {
    let n = tch::Cuda::device_count() as usize;
    Device::Cuda(local_rank % n.max(1))
}

/// The first variable of [`GPU_ALLOCATION_VARS`] (read through `env`) that names at least one GPU,
/// with its value. Empty values, `-1`, `0` counts and Slurm's `NoDevFiles` allocate none.
pub fn launcher_gpus(env: impl Fn(&str) -> Option<String>) -> Option<(&'static str, String)> {
    GPU_ALLOCATION_VARS.into_iter().find_map(|var| {
        let value = env(var)?;
        let v = value.trim();
        let none = v.is_empty()
            || v == "-1"
            || v == "0"
            || v.eq_ignore_ascii_case("NoDevFiles")
            || v.eq_ignore_ascii_case("none");
        (!none).then(|| (var, value.clone()))
    })
}

/// `train.device = "auto"`: this rank's GPU when libtorch sees one (`cuda_available`), the CPU when
/// the job has no GPUs, and an error naming the likely cause when the launcher allocated GPUs
/// (`env`, see [`launcher_gpus`]) that libtorch does not see: a 512-rank job must not crawl on CPUs.
pub fn auto(local_rank: usize, cuda_available: bool, env: impl Fn(&str) -> Option<String>) -> Result<Device, String> {
    if cuda_available {
        return Ok(local_gpu(local_rank));
    }
    match launcher_gpus(env) {
        None => Ok(Device::Cpu),
        Some((var, value)) => Err(format!(
            "train.device = \"auto\": the launcher allocated GPUs ({var}={value}) but libtorch sees no CUDA device. \
             The likely cause is a node driver older than the CUDA of this PyTorch wheel (or a CPU-only wheel): \
             run through scripts/with-node-torch to use the node's own PyTorch, or set train.device = \"cpu\" to \
             train on the CPU on purpose"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn auto_refuses_the_cpu_when_the_launcher_allocated_gpus() {
        for (var, value) in [
            ("CUDA_VISIBLE_DEVICES", "0,1,2,3"),
            ("SLURM_GPUS", "8"),
            ("SLURM_GPUS_ON_NODE", "4"),
            ("SLURM_GPUS_PER_NODE", "h100:4"),
            ("SLURM_GPUS_PER_TASK", "1"),
            ("SLURM_JOB_GPUS", "0,1"),
            ("SLURM_STEP_GPUS", "3"),
        ] {
            let e = auto(0, false, env(&[(var, value)])).unwrap_err();
            assert!(e.contains(&format!("{var}={value}")), "{e}");
            assert!(e.contains("driver older") && e.contains("scripts/with-node-torch"), "{e}");
        }
        // With a GPU visible to libtorch, the same allocation trains on it.
        if tch::Cuda::is_available() {
            assert!(auto(0, true, env(&[("SLURM_JOB_GPUS", "0")])).unwrap().is_cuda());
        }
    }

    #[test]
    fn auto_uses_the_cpu_when_no_gpu_was_allocated() {
        assert_eq!(auto(0, false, env(&[])), Ok(Device::Cpu));
        let none = [
            ("CUDA_VISIBLE_DEVICES", ""),
            ("CUDA_VISIBLE_DEVICES", "-1"),
            ("SLURM_JOB_GPUS", "NoDevFiles"),
            ("SLURM_GPUS_ON_NODE", "0"),
        ];
        for (var, value) in none {
            assert_eq!(auto(0, false, env(&[(var, value)])), Ok(Device::Cpu), "{var}={value}");
        }
    }
}
