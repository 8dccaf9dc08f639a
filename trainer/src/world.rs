//! The job's ranks as one command sees them: who this rank is, its device and thread count, and the
//! channels to the other ranks. Training and `trainer eval` start one; the other commands run alone.

use anyhow::{Context, Result};
use tch::Device;

use crate::config::{Config, Precision};
use crate::dist::{self, env::RankEnv, Collective, Control};

pub struct World {
    pub rank_env: RankEnv,
    /// Model tensors between ranks (NCCL, Gloo, MPI, or one process).
    pub collective: Box<dyn Collective>,
    /// Host messages between ranks (stop vote, cursors, checkpoint choice).
    pub control: Box<dyn Control>,
    pub device: Device,
    /// The job's store and watchdog; [`World::finish`] ends them in order.
    pub job: dist::Job,
}

impl World {
    /// Join the job's ranks (the job's TCPStore under srun/mpirun/torchrun, else a single process),
    /// pick this rank's device and thread count, connect the collectives, and say so once. A failure
    /// after joining reaches the other ranks as the job's abort notice.
    pub fn start(cfg: &Config) -> Result<World> {
        let rank_env = dist::env::detect().context("reading the launcher's rank environment")?;
        let joined = dist::join(&rank_env, &cfg.dist)?;
        let device = cfg.train.device.resolve(rank_env.local_rank).map_err(anyhow::Error::msg)?;
        if cfg.train.threads > 0 {
            tch::set_num_threads(cfg.train.threads as i32);
        }
        let d = joined.connect(device, &cfg.dist)?;
        if device.is_cuda() {
            // As OpenCLIP's main.py: TF32 matmuls and convolutions, cuDNN picks its fastest kernels.
            crate::cuda::enable_tf32_and_cudnn_benchmark();
        }
        if rank_env.rank == 0 {
            eprintln!(
                "ferroclip: {} rank(s) via {:?}, {}; rank 0 on {device:?}, {} libtorch threads",
                rank_env.world_size,
                rank_env.launcher,
                d.description,
                tch::get_num_threads()
            );
            if cfg.train.precision == Precision::AmpBf16 && device == Device::Cpu {
                eprintln!("ferroclip: precision amp_bf16 applies on CUDA only; running fp32 on the CPU");
            }
        }
        Ok(World { rank_env, collective: d.collective, control: d.control, device, job: d.job })
    }

    /// Ends the job in order (see [`dist::Job::shutdown`]).
    pub fn finish(self) {
        self.job.shutdown(self.control.as_ref());
    }
}
