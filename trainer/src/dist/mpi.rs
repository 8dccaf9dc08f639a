//! The MPI backend (`dist.backend = "mpi"`, the `mpi` feature; the `mpi` crate over OpenMPI), for sites
//! that launch with `mpirun` and want MPI's bootstrap: MPI tells every rank where rank 0 serves the
//! job's store ([`share_master`], no MASTER_ADDR needed), then carries the model collectives, on CPU
//! tensors; CUDA tensors are staged through host memory, so this works with any MPI build, CUDA-aware
//! or not. Control messages and the watchdog use the store and a Gloo group as with every backend.
//!
//! MPI is initialized once per process and finalized when the [`MpiCollective`] is dropped, so
//! [`init`] hands out the one instance; keep it alive for the whole run. Reductions follow the buffer
//! discipline of llm.c's `zero.cuh` bootstrap: the `mpi` crate has no in-place all-reduce, so the send
//! side is a copy.

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use tch::{Device, Kind, Tensor};

use super::env::{self, Launcher, RankEnv};
use super::rendezvous::Master;
use super::Collective;

/// Collectives over `MPI_COMM_WORLD`.
pub struct MpiCollective {
    // Field order matters: the communicator must go before the universe, whose drop finalizes MPI.
    world: SimpleCommunicator,
    _universe: Universe,
    rank: usize,
    world_size: usize,
}

/// Initializes MPI when this process was started by `mpirun` or `srun`; `None` for a plain
/// single-process run (no MPI needed), or when MPI was already initialized in this process.
///
/// Threading level is `Funneled`: the data loader has threads, but only the main thread calls MPI.
pub fn init() -> Option<MpiCollective> {
    match env::detect() {
        Ok(e) if e.launcher != Launcher::Single => {}
        _ => return None,
    }
    let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)?;
    let world = universe.world();
    let (rank, world_size) = (world.rank() as usize, world.size() as usize);
    Some(MpiCollective { world, _universe: universe, rank, world_size })
}

/// Calls `MPI_Abort` on the world if MPI is up; for the panic hook, which has no collective at
/// hand. Returns only when MPI is not running.
pub fn abort_world_if_initialized(code: i32) {
    if mpi::environment::is_initialized() && !mpi::environment::is_finalized() {
        // SAFETY: MPI is initialized and not finalized; MPI_Abort is callable from any thread.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, code);
        }
    }
}

/// Checks that MPI and the launcher's environment agree on who this rank is.
pub fn check_matches(m: &MpiCollective, rank_env: &RankEnv) -> anyhow::Result<()> {
    anyhow::ensure!(
        (m.rank, m.world_size) == (rank_env.rank, rank_env.world_size),
        "MPI says rank {} of {}, the launcher's environment rank {} of {}: was the job started with \
         `srun --mpi=pmix` (or the cluster's PMI plugin)?",
        m.rank,
        m.world_size,
        rank_env.rank,
        rank_env.world_size
    );
    Ok(())
}

/// MPI's bootstrap of the store: rank 0 picks its host (`MASTER_ADDR` or its host name) and a port
/// (`MASTER_PORT` or a free one) and broadcasts them to every rank.
pub fn share_master(m: &MpiCollective, rank_env: &RankEnv) -> anyhow::Result<Master> {
    use anyhow::Context;
    let mut buf = [0u8; 256];
    if rank_env.rank == 0 {
        let host = match std::env::var("MASTER_ADDR") {
            Ok(h) if !h.is_empty() => h,
            _ => host_name()?,
        };
        let port: u16 = match std::env::var("MASTER_PORT") {
            Ok(p) if !p.is_empty() => p.parse().with_context(|| format!("MASTER_PORT={p:?} is not a port number"))?,
            _ => std::net::TcpListener::bind(("0.0.0.0", 0))
                .and_then(|l| l.local_addr())
                .context("finding a free port")?
                .port(),
        };
        let text = format!("{host}:{port}");
        anyhow::ensure!(text.len() < buf.len(), "host name too long: {host}");
        buf[..text.len()].copy_from_slice(text.as_bytes());
    }
    m.world.process_at_rank(0).broadcast_into(&mut buf[..]);
    let text = String::from_utf8_lossy(&buf).trim_end_matches('\0').to_string();
    let (host, port) = text.rsplit_once(':').context("MPI broadcast a malformed store address")?;
    Ok(Master {
        host: host.to_string(),
        port: port.parse().context("MPI broadcast a malformed port")?,
        source: "broadcast by rank 0 over MPI".into(),
        agent_store: false,
    })
}

fn host_name() -> anyhow::Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    anyhow::ensure!(rc == 0, "gethostname failed");
    Ok(String::from_utf8_lossy(&buf).trim_end_matches('\0').to_string())
}

/// A contiguous CPU view of `t`: `t` itself when it already is one, else a copy. Returns whether
/// results must be copied back into `t`.
fn host_view(t: &Tensor) -> (Tensor, bool) {
    let host = t.to_device(Device::Cpu).contiguous();
    let copy_back = host.data_ptr() != t.data_ptr() || t.device() != Device::Cpu;
    (host, copy_back)
}

/// The bytes of a contiguous CPU tensor.
///
/// SAFETY (for callers): `t` must be contiguous, on the CPU, and outlive the slice; nothing else
/// may touch its storage meanwhile (tensors sharing it included).
unsafe fn bytes_mut(t: &mut Tensor) -> &mut [u8] {
    let n = t.numel() * t.kind().elt_size_in_bytes();
    if n == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, n)
}

/// Typed elements of a contiguous CPU tensor; same contract as [`bytes_mut`].
unsafe fn elems_mut<T>(t: &mut Tensor) -> &mut [T] {
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n)
}

impl MpiCollective {
    fn sum_into<T: Equivalence + Copy>(&self, host: &mut Tensor) {
        // SAFETY: `host` is a contiguous CPU tensor owned here for the duration of the call.
        let recv = unsafe { elems_mut::<T>(host) };
        let send = recv.to_vec();
        self.world.all_reduce_into(&send[..], recv, SystemOperation::sum());
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, t: &mut Tensor) {
        let (mut host, copy_back) = host_view(t);
        match host.kind() {
            Kind::Float => self.sum_into::<f32>(&mut host),
            Kind::Double => self.sum_into::<f64>(&mut host),
            Kind::Int64 => self.sum_into::<i64>(&mut host),
            Kind::Int => self.sum_into::<i32>(&mut host),
            // Half-precision sums would need a user-defined MPI op; gradients are reduced in f32.
            k => panic!("MPI all_reduce_sum supports f32, f64, i64 and i32 tensors, not {k:?}"),
        }
        if copy_back {
            t.copy_(&host);
        }
    }

    fn all_gather(&self, t: &Tensor) -> Tensor {
        let (mut host, _) = host_view(t);
        let mut shape = host.size();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] *= self.world_size as i64;
        let mut out = Tensor::empty(shape.as_slice(), (host.kind(), Device::Cpu));
        // Every rank contributes the same byte count, so gathering bytes is exact for any dtype.
        // SAFETY: both tensors are contiguous CPU tensors owned here.
        let (send, recv) = unsafe { (bytes_mut(&mut host), bytes_mut(&mut out)) };
        self.world.all_gather_into(&send[..], recv);
        out.to_device(t.device())
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) {
        let (mut host, copy_back) = host_view(t);
        // SAFETY: `host` is a contiguous CPU tensor owned here.
        self.world.process_at_rank(root as i32).broadcast_into(unsafe { bytes_mut(&mut host) });
        if copy_back {
            t.copy_(&host);
        }
    }

    fn barrier(&self) {
        self.world.barrier();
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
