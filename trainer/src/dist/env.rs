//! Who am I? Rank, world size and local rank from the launcher's environment.
//!
//! The same binary runs under `srun` (Slurm sets `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`,
//! `SLURM_LOCALID`, ...), under OpenMPI's `mpirun` (`OMPI_COMM_WORLD_*`), under torchrun or any
//! launcher that sets torch.distributed's `RANK`/`WORLD_SIZE`/`LOCAL_RANK`, or alone. This follows
//! OpenCLIP's `open_clip_train/distributed.py::world_info_from_env`: torchrun's variables first (torchrun
//! inside an srun step sees the step's `SLURM_*` too, describing one task per node), then OpenMPI over
//! Slurm: an `mpirun` inside an `sbatch` allocation inherits the allocation's `SLURM_*` variables,
//! which describe the batch step (one task), not the MPI job.

use thiserror::Error;

/// Which launcher started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher: one process, rank 0 of 1.
    Single,
    /// A Slurm job step (`srun`).
    Slurm,
    /// OpenMPI's `mpirun`/`mpiexec`.
    OpenMpi,
    /// torchrun, or anything else that sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`/`MASTER_PORT`.
    Torchrun,
}

/// This process's place in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankEnv {
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Number of processes in the job.
    pub world_size: usize,
    /// Rank among the processes on this node; picks the GPU.
    pub local_rank: usize,
    /// Number of processes on this node.
    pub local_world_size: usize,
    pub launcher: Launcher,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RankEnvError {
    #[error("environment variable {var}={value:?} is not a non-negative integer")]
    NotANumber { var: &'static str, value: String },
    #[error("{launcher:?} launch without {var} set")]
    Missing { launcher: Launcher, var: &'static str },
    #[error("inconsistent {launcher:?} environment: {what}")]
    Inconsistent { launcher: Launcher, what: String },
    #[error("cannot parse SLURM tasks-per-node list {0:?}")]
    TasksPerNode(String),
}

impl RankEnv {
    /// One process, no launcher.
    pub fn single() -> Self {
        RankEnv { rank: 0, world_size: 1, local_rank: 0, local_world_size: 1, launcher: Launcher::Single }
    }

    /// True for rank 0, the one that writes logs and checkpoints.
    pub fn is_primary(&self) -> bool {
        self.rank == 0
    }
}

/// Reads the process environment; see [`from_lookup`].
pub fn detect() -> Result<RankEnv, RankEnvError> {
    from_lookup(|k| std::env::var(k).ok())
}

/// Works out the rank from environment variables looked up through `lookup` (tests pass a map).
pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<RankEnv, RankEnvError> {
    let num = |var: &'static str| -> Result<Option<usize>, RankEnvError> {
        match lookup(var) {
            None => Ok(None),
            Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| RankEnvError::NotANumber { var, value: v }),
        }
    };
    let need = |launcher: Launcher, var: &'static str| -> Result<usize, RankEnvError> {
        num(var)?.ok_or(RankEnvError::Missing { launcher, var })
    };

    let env = if let (Some(rank), Some(world_size)) = (num("RANK")?, num("WORLD_SIZE")?) {
        let l = Launcher::Torchrun;
        RankEnv {
            rank,
            world_size,
            local_rank: need(l, "LOCAL_RANK")?,
            local_world_size: num("LOCAL_WORLD_SIZE")?.unwrap_or(world_size),
            launcher: l,
        }
    } else if let Some(rank) = num("OMPI_COMM_WORLD_RANK")? {
        let l = Launcher::OpenMpi;
        RankEnv {
            rank,
            world_size: need(l, "OMPI_COMM_WORLD_SIZE")?,
            local_rank: need(l, "OMPI_COMM_WORLD_LOCAL_RANK")?,
            local_world_size: need(l, "OMPI_COMM_WORLD_LOCAL_SIZE")?,
            launcher: l,
        }
    } else if lookup("SLURM_STEP_ID").is_some() && lookup("SLURM_PROCID").is_some() {
        // Only a job step started by srun has SLURM_STEP_ID; the batch script itself has
        // SLURM_PROCID=0 and the allocation's SLURM_NTASKS, and would otherwise wait for
        // ranks that never start.
        let l = Launcher::Slurm;
        let world_size = match num("SLURM_STEP_NUM_TASKS")? {
            Some(n) => n,
            None => need(l, "SLURM_NTASKS")?,
        };
        let local_world_size = match lookup("SLURM_STEP_TASKS_PER_NODE").or_else(|| lookup("SLURM_TASKS_PER_NODE")) {
            Some(list) => tasks_on_node(&list, num("SLURM_NODEID")?.unwrap_or(0))?,
            None => 1,
        };
        RankEnv {
            rank: need(l, "SLURM_PROCID")?,
            world_size,
            local_rank: need(l, "SLURM_LOCALID")?,
            local_world_size,
            launcher: l,
        }
    } else {
        RankEnv::single()
    };

    let bad = |what: String| RankEnvError::Inconsistent { launcher: env.launcher, what };
    if env.world_size == 0 || env.rank >= env.world_size {
        return Err(bad(format!("rank {} in a world of {}", env.rank, env.world_size)));
    }
    if env.local_world_size == 0 || env.local_rank >= env.local_world_size {
        return Err(bad(format!("local rank {} of {} on this node", env.local_rank, env.local_world_size)));
    }
    Ok(env)
}

/// Task count of node `node` from Slurm's compressed list, e.g. `"4(x2),3"` = 4, 4, 3.
fn tasks_on_node(list: &str, node: usize) -> Result<usize, RankEnvError> {
    let err = || RankEnvError::TasksPerNode(list.to_string());
    let mut seen = 0;
    for item in list.split(',') {
        let (count, repeat) = match item.split_once("(x") {
            Some((c, r)) => (c, r.strip_suffix(')').ok_or_else(err)?),
            None => (item, "1"),
        };
        let count: usize = count.trim().parse().map_err(|_| err())?;
        let repeat: usize = repeat.trim().parse().map_err(|_| err())?;
        if node < seen + repeat {
            return Ok(count);
        }
        seen += repeat;
    }
    Err(err())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> Result<RankEnv, RankEnvError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn no_launcher_is_single_process() {
        assert_eq!(env_of(&[("HOME", "/root")]).unwrap(), RankEnv::single());
    }

    #[test]
    fn srun_step_gives_slurm_ranks() {
        let e = env_of(&[
            ("SLURM_JOB_ID", "17"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "11"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_STEP_NUM_TASKS", "12"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "2"),
            ("SLURM_STEP_TASKS_PER_NODE", "5(x2),2"),
        ])
        .unwrap();
        // The step's own task count wins over the allocation's SLURM_NTASKS.
        assert_eq!(
            e,
            RankEnv { rank: 11, world_size: 12, local_rank: 1, local_world_size: 2, launcher: Launcher::Slurm }
        );
    }

    #[test]
    fn slurm_rank_out_of_range_is_an_error() {
        // SLURM_PROCID 13 in a 12-task step cannot happen; say so instead of hanging later.
        let e = env_of(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "13"),
            ("SLURM_STEP_NUM_TASKS", "12"),
            ("SLURM_LOCALID", "0"),
        ]);
        assert!(matches!(e, Err(RankEnvError::Inconsistent { launcher: Launcher::Slurm, .. })), "{e:?}");
    }

    #[test]
    fn batch_script_without_srun_is_single_process() {
        let e =
            env_of(&[("SLURM_JOB_ID", "17"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "16"), ("SLURM_LOCALID", "0")]);
        assert_eq!(e.unwrap(), RankEnv::single());
    }

    #[test]
    fn slurm_falls_back_to_ntasks_and_tasks_per_node() {
        let e = env_of(&[
            ("SLURM_STEP_ID", "3"),
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "1"),
            ("SLURM_TASKS_PER_NODE", "4(x2)"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank, e.local_world_size), (5, 8, 1, 4));
    }

    #[test]
    fn mpirun_wins_over_the_surrounding_allocation() {
        let e = env_of(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_LOCALID", "0"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!(
            e,
            RankEnv { rank: 3, world_size: 4, local_rank: 1, local_world_size: 2, launcher: Launcher::OpenMpi }
        );
    }

    #[test]
    fn torchrun_variables_win_over_the_surrounding_srun_step() {
        let e = env_of(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("RANK", "5"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "5"),
            ("LOCAL_WORLD_SIZE", "8"),
        ])
        .unwrap();
        assert_eq!(
            e,
            RankEnv { rank: 5, world_size: 16, local_rank: 5, local_world_size: 8, launcher: Launcher::Torchrun }
        );
        let e = env_of(&[("RANK", "0"), ("WORLD_SIZE", "2")]);
        assert_eq!(e, Err(RankEnvError::Missing { launcher: Launcher::Torchrun, var: "LOCAL_RANK" }));
    }

    #[test]
    fn garbage_and_missing_values_are_named() {
        let e = env_of(&[("OMPI_COMM_WORLD_RANK", "x")]);
        assert_eq!(e, Err(RankEnvError::NotANumber { var: "OMPI_COMM_WORLD_RANK", value: "x".into() }));
        let e = env_of(&[("OMPI_COMM_WORLD_RANK", "0")]);
        assert_eq!(e, Err(RankEnvError::Missing { launcher: Launcher::OpenMpi, var: "OMPI_COMM_WORLD_SIZE" }));
    }

    #[test]
    fn compressed_tasks_per_node_lists() {
        assert_eq!(tasks_on_node("8", 0), Ok(8));
        assert_eq!(tasks_on_node("4(x2),3", 0), Ok(4));
        assert_eq!(tasks_on_node("4(x2),3", 1), Ok(4));
        assert_eq!(tasks_on_node("4(x2),3", 2), Ok(3));
        assert!(tasks_on_node("4(x2),3", 3).is_err());
        assert!(tasks_on_node("4(x2", 0).is_err());
    }
}
