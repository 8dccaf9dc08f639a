//! Collectives across ranks. The trainer talks to a [`Collective`]; backends are
//! [`single`] (one process), [`mpi`] (CPU tensors, CUDA staged through the host) and [`nccl`]
//! (CUDA tensors). [`env`] says which rank this process is; [`fail_fast`] and [`preempt`] keep a
//! job from hanging when one rank fails or is asked to stop.

use tch::Tensor;

pub mod env;
pub mod fail_fast;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod preempt;
pub mod selftest;
pub mod single;

/// The collective operations the trainer needs. Tensors are contiguous; results are in rank order.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sum `t` over all ranks, in place.
    fn all_reduce_sum(&self, t: &mut Tensor);
    /// Concatenate every rank's `t` along dim 0, in rank order (shapes equal on all ranks).
    fn all_gather(&self, t: &Tensor) -> Tensor;
    /// Overwrite `t` with rank `root`'s value.
    fn broadcast(&self, t: &mut Tensor, root: usize);
    fn barrier(&self);
    /// Stop the whole job now with exit status `code` (MPI_Abort for MPI-based backends), so that
    /// the other ranks do not wait forever in their next collective. One process just exits.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The collective for this process: MPI when a launcher (`srun`, `mpirun`) started several ranks,
/// NCCL on top of it when the rank runs on a GPU and the `nccl` feature is built, else one process.
/// Checks that MPI and the launcher's environment agree on who this rank is.
pub fn connect(rank_env: &env::RankEnv, device: tch::Device) -> anyhow::Result<Box<dyn Collective>> {
    if rank_env.launcher == env::Launcher::Single {
        return connect_single(device);
    }
    #[cfg(feature = "mpi")]
    {
        let m = mpi::init().ok_or_else(|| anyhow::anyhow!("MPI did not initialize under {:?}", rank_env.launcher))?;
        anyhow::ensure!(
            (m.rank(), m.world_size()) == (rank_env.rank, rank_env.world_size),
            "MPI says rank {} of {}, the launcher's environment rank {} of {}: was the job started with \
             `srun --mpi=pmix` (or the cluster's PMI plugin)?",
            m.rank(),
            m.world_size(),
            rank_env.rank,
            rank_env.world_size
        );
        #[cfg(feature = "nccl")]
        if let tch::Device::Cuda(i) = device {
            return Ok(Box::new(nccl::NcclCollective::new(Some(m), i)?));
        }
        let _ = device;
        Ok(Box::new(m))
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = device;
        if rank_env.world_size == 1 {
            return Ok(Box::new(single::Single));
        }
        anyhow::bail!(
            "started as rank {} of {} by {:?}, but this binary was built without MPI: rebuild with \
             `--features mpi` (scripts/setup does)",
            rank_env.rank,
            rank_env.world_size,
            rank_env.launcher
        )
    }
}

fn connect_single(device: tch::Device) -> anyhow::Result<Box<dyn Collective>> {
    #[cfg(feature = "nccl")]
    if let tch::Device::Cuda(i) = device {
        // A one-GPU run still goes through NCCL, so it exercises the same code path as a cluster run.
        return Ok(Box::new(nccl::NcclCollective::new(None, i)?));
    }
    let _ = device;
    Ok(Box::new(single::Single))
}

/// Every rank's `bytes` (any lengths), in rank order: two all-gathers, lengths then padded payloads.
/// `device` is where the collective's tensors live (the GPU for NCCL).
pub fn all_gather_bytes(collective: &dyn Collective, bytes: &[u8], device: tch::Device) -> Vec<Vec<u8>> {
    use tch::{Kind, Tensor};
    if collective.world_size() == 1 {
        return vec![bytes.to_vec()];
    }
    let lengths = collective.all_gather(&Tensor::from_slice(&[bytes.len() as i64]).to_device(device));
    let lengths: Vec<i64> = Vec::try_from(lengths.to_device(tch::Device::Cpu)).expect("int64 lengths");
    let max = *lengths.iter().max().unwrap_or(&0) as usize;
    let mut padded = bytes.to_vec();
    padded.resize(max, 0);
    let all = collective.all_gather(&Tensor::from_slice(&padded).to_kind(Kind::Uint8).to_device(device));
    let all: Vec<u8> = Vec::try_from(all.to_device(tch::Device::Cpu)).expect("uint8 payloads");
    lengths.iter().enumerate().map(|(r, &n)| all[r * max..r * max + n as usize].to_vec()).collect()
}
