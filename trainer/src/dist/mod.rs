//! Distributed training. [`env`] says which rank this process is; [`rendezvous`] finds the job's
//! TCPStore (from Slurm, OpenMPI or torchrun variables) and joins it; then two paths connect the ranks:
//!
//! - [`Collective`], for model tensors: c10d's ProcessGroupNCCL for CUDA tensors and ProcessGroupGloo
//!   for CPU tensors ([`group::DeviceGroup`], through the C++ shim in [`c10d`]), MPI with the `mpi`
//!   feature ([`mpi`]), or nothing for one process ([`single`]);
//! - [`Control`], for host messages that steer the job (stop vote, step agreement, data cursors, the
//!   checkpoint choice): always on host bytes, over a Gloo group of its own ([`group::GlooControl`]).
//!
//! [`grad_buckets`] overlaps the gradient all-reduce with backward. [`watchdog`] (heartbeats, the
//! abort notice, progress) and [`fail_fast`] end a job that cannot make progress, naming the rank;
//! [`preempt`] turns Slurm's signals into a checkpoint and a requeue.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tch::{Device, Tensor};

use crate::config::{Backend, DistConfig};

pub mod c10d;
pub mod control;
pub mod env;
pub mod fail_fast;
pub mod grad_buckets;
pub mod group;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod open_files;
pub mod preempt;
pub mod rendezvous;
pub mod selftest;
pub mod single;
pub mod watchdog;

pub use control::Control;

/// The collective operations on model tensors. Tensors are on the training device; results are in
/// rank order. A failure (a timeout, a lost peer) ends the job, naming the operation, so the calls
/// return no errors. Every rank must make the same calls in the same order.
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
    /// Stop the whole job now with exit status `code`, so that the other ranks do not wait forever
    /// in their next collective. One process just exits.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    /// The sum over ranks of `t` (`[W·n, ...]`, same shape everywhere), of which this rank gets its
    /// rows `rank·n .. (rank+1)·n` (`reduce_scatter`). By default an all-reduce and a slice.
    fn reduce_scatter_sum(&self, t: &Tensor) -> Tensor {
        let mut all = t.copy();
        self.all_reduce_sum(&mut all);
        let n = t.size()[0] / self.world_size() as i64;
        all.narrow(0, self.rank() as i64 * n, n)
    }
    /// The c10d process group behind this collective, if any: [`grad_buckets`] then all-reduces
    /// gradient buckets from backward hooks, overlapped with the rest of backward.
    fn process_group(&self) -> Option<&c10d::ProcessGroup> {
        None
    }
}

/// A job this process has joined: the store (for several ranks) and its watchdog, before the
/// collectives exist. Errors from here on reach the other ranks as the abort notice.
pub struct Joined {
    rank_env: env::RankEnv,
    store: Option<c10d::Store>,
    watchdog: Option<watchdog::Watchdog>,
    #[cfg(feature = "mpi")]
    mpi: Option<mpi::MpiCollective>,
}

/// The connected job: both paths between the ranks, and what keeps the job alive.
pub struct Dist {
    pub collective: Box<dyn Collective>,
    pub control: Box<dyn Control>,
    /// What connects the ranks, for the start-up line (`"gloo (control messages over gloo)"`, ...).
    pub description: String,
    pub job: Job,
}

/// The job's store (served by rank 0; `None` for one process) and this rank's watchdog, until
/// [`Job::shutdown`].
pub struct Job {
    store: Option<c10d::Store>,
    watchdog: Option<watchdog::Watchdog>,
}

fn seconds(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Joins the job described by `rank_env`: for several ranks, connects to the job's store (MPI's
/// bootstrap with `dist.backend = "mpi"`, else from the launcher's environment, see [`rendezvous`]),
/// waits until every rank has, and starts the [`watchdog`].
pub fn join(rank_env: &env::RankEnv, cfg: &DistConfig) -> Result<Joined> {
    #[cfg_attr(not(feature = "mpi"), allow(unused_mut))]
    let mut joined = Joined {
        rank_env: *rank_env,
        store: None,
        watchdog: None,
        #[cfg(feature = "mpi")]
        mpi: None,
    };
    if rank_env.world_size == 1 {
        return Ok(joined);
    }
    c10d::quiet_cpp_warnings();
    let timeout = seconds(cfg.timeout_s);
    let master = match cfg.backend {
        #[cfg(feature = "mpi")]
        Backend::Mpi => {
            let m = mpi::init().with_context(|| format!("MPI did not initialize under {:?}", rank_env.launcher))?;
            mpi::check_matches(&m, rank_env)?;
            let master = mpi::share_master(&m, rank_env)?;
            joined.mpi = Some(m);
            master
        }
        _ => rendezvous::master_from_lookup(rank_env, |k| std::env::var(k).ok())
            .with_context(|| format!("rank {}: finding the job's rendezvous", rank_env.rank))?,
    };
    let store = rendezvous::join(rank_env, &master, timeout)?;
    fail_fast::register(rank_env.rank, rank_env.world_size, store.clone_client()?);
    let limits = watchdog::Limits {
        heartbeat_timeout: seconds(cfg.heartbeat_timeout_s),
        step_timeout: (cfg.step_timeout_s > 0).then(|| seconds(cfg.step_timeout_s)),
        store_addr: format!("{}:{}", master.host, master.port),
    };
    joined.watchdog = Some(watchdog::start(&store, rank_env.rank, rank_env.world_size, limits)?);
    joined.store = Some(store);
    Ok(joined)
}

impl Joined {
    pub fn rank_env(&self) -> &env::RankEnv {
        &self.rank_env
    }

    /// Connects the collectives: the device path for `device` as `dist.backend` says, and the control
    /// path. Every rank must call this.
    pub fn connect(self, device: Device, cfg: &DistConfig) -> Result<Dist> {
        let (rank, world) = (self.rank_env.rank, self.rank_env.world_size);
        let timeout = seconds(cfg.timeout_s);
        let cuda = match device {
            Device::Cuda(i) => Some(i),
            _ => None,
        };
        let backend = match (cfg.backend, cuda) {
            (Backend::Auto, Some(_)) => Backend::Nccl,
            (Backend::Auto, None) => Backend::Gloo,
            (Backend::Nccl, None) => bail!("dist.backend = \"nccl\" needs CUDA, but this rank runs on {device:?}"),
            (b, _) => b,
        };
        let Some(store) = self.store else {
            // One process: nothing to connect, except that a GPU run still goes through NCCL, so it
            // exercises the same path as a cluster run.
            if let (Backend::Nccl, Some(i)) = (backend, cuda) {
                let store = c10d::Store::hash()?;
                let nccl = c10d::ProcessGroup::nccl(&store, 0, 1, timeout, i).context("creating ProcessGroupNCCL")?;
                return Ok(Dist {
                    collective: Box::new(group::DeviceGroup::new(nccl, 0, 1, device, cfg.strict_device)),
                    control: Box::new(single::Single),
                    description: "nccl (one rank)".into(),
                    // The process group holds its own reference to the in-process store.
                    job: Job { store: None, watchdog: None },
                });
            }
            return Ok(Dist {
                collective: Box::new(single::Single),
                control: Box::new(single::Single),
                description: "one process".into(),
                job: Job { store: None, watchdog: None },
            });
        };
        let ifnames = std::env::var("GLOO_SOCKET_IFNAME").ok();
        let collective: Box<dyn Collective> = match backend {
            Backend::Nccl => {
                let i = cuda.expect("checked above");
                let g = c10d::ProcessGroup::nccl(&store.prefixed("nccl")?, rank, world, timeout, i)
                    .with_context(|| format!("rank {rank}: creating ProcessGroupNCCL on cuda:{i}"))?;
                Box::new(group::DeviceGroup::new(g, rank, world, device, cfg.strict_device))
            }
            Backend::Gloo => {
                let g = c10d::ProcessGroup::gloo(&store.prefixed("gloo")?, rank, world, timeout, ifnames.as_deref())
                    .with_context(|| format!("rank {rank}: creating ProcessGroupGloo"))?;
                Box::new(group::DeviceGroup::new(g, rank, world, device, cfg.strict_device))
            }
            #[cfg(feature = "mpi")]
            Backend::Mpi => Box::new(self.mpi.context("MPI was initialized in join")?),
            #[cfg(not(feature = "mpi"))]
            Backend::Mpi => bail!("dist.backend = \"mpi\" needs a trainer built with `--features mpi`"),
            Backend::Auto => unreachable!("resolved above"),
        };
        let control = c10d::ProcessGroup::gloo(&store.prefixed("control")?, rank, world, timeout, ifnames.as_deref())
            .with_context(|| format!("rank {rank}: creating the Gloo control group"))?;
        let name = match backend {
            Backend::Nccl => "nccl",
            Backend::Gloo => "gloo",
            Backend::Mpi => "mpi",
            Backend::Auto => "auto",
        };
        Ok(Dist {
            collective,
            control: Box::new(group::GlooControl::new(control, rank, world)),
            description: format!("{name} (control messages over gloo)"),
            job: Job { store: Some(store), watchdog: self.watchdog },
        })
    }
}

impl Job {
    /// Another client of the job's store (`None` for one process).
    pub fn store_client(&self) -> Result<Option<c10d::Store>> {
        Ok(match &self.store {
            Some(s) => Some(s.clone_client()?),
            None => None,
        })
    }

    /// After work only rank 0 does (writing a checkpoint, evaluating): rank 0 says it is done under
    /// `tag`, the others wait for that, for as long as it takes. A collective barrier would time out
    /// after `dist.timeout_s`; here the watchdog still ends the job if rank 0 stops responding.
    pub fn after_rank0(&self, rank: usize, tag: &str) -> Result<()> {
        let Some(store) = &self.store else { return Ok(()) };
        let key = format!("rank0_done/{tag}");
        if rank == 0 {
            store.set(&key, b"1")?;
            return Ok(());
        }
        // Each get waits up to the store's timeout; a failing store is the watchdog's business.
        while store.get(&key).is_err() {
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The orderly end of a job: a last control message (every rank is done), then the watchdog
    /// stops. After this, rank 0 may exit and take the store with it.
    pub fn shutdown(self, control: &dyn Control) {
        if control.world_size() > 1 {
            let _ = control.all_gather_bytes(&[]);
        }
        if let Some(w) = self.watchdog {
            w.stop();
        }
    }
}
