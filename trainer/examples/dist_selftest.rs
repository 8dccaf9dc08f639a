//! Checks the distributed layer end to end under a real launcher:
//!
//!   mpirun --allow-run-as-root --oversubscribe -np 2 target/debug/examples/dist_selftest
//!   srun -n 2 --mpi=pmix target/debug/examples/dist_selftest
//!
//! Options: `--backend mpi|nccl` (default mpi; nccl needs GPUs and the `nccl` feature),
//! `--fail-rank R` (rank R returns an error before the first collective: the job must stop within
//! seconds, not hang), `--panic-rank R` (same with a panic).

use anyhow::{bail, Context, Result};
use ferroclip::dist::{env, fail_fast, selftest, single::Single, Collective};

struct Args {
    backend: String,
    fail_rank: Option<usize>,
    panic_rank: Option<usize>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { backend: "mpi".into(), fail_rank: None, panic_rank: None };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--backend" => args.backend = value("--backend")?,
            "--fail-rank" => args.fail_rank = Some(value("--fail-rank")?.parse().context("--fail-rank")?),
            "--panic-rank" => args.panic_rank = Some(value("--panic-rank")?.parse().context("--panic-rank")?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(args)
}

fn collective(backend: &str) -> Result<Box<dyn Collective>> {
    let rank_env = env::detect()?;
    let mpi = ferroclip::dist::mpi::init();
    if let Some(m) = &mpi {
        anyhow::ensure!(
            (m.rank(), m.world_size()) == (rank_env.rank, rank_env.world_size),
            "MPI says rank {} of {}, the environment {:?}",
            m.rank(),
            m.world_size(),
            rank_env
        );
    }
    match backend {
        "mpi" => Ok(match mpi {
            Some(m) => Box::new(m),
            None => Box::new(Single),
        }),
        #[cfg(feature = "nccl")]
        "nccl" => Ok(Box::new(ferroclip::dist::nccl::NcclCollective::new(mpi, rank_env.local_rank)?)),
        other => bail!("unknown or not compiled-in backend {other:?}"),
    }
}

fn run(c: &dyn Collective, args: &Args) -> Result<()> {
    if args.fail_rank == Some(c.rank()) {
        bail!("injected failure on rank {}", c.rank());
    }
    if args.panic_rank == Some(c.rank()) {
        panic!("injected panic on rank {}", c.rank());
    }
    let device = match args.backend.as_str() {
        "nccl" => tch::Device::Cuda(env::detect()?.local_rank),
        _ => tch::Device::Cpu,
    };
    selftest::run_on(c, device)
}

fn main() {
    fail_fast::install_abort_on_panic();
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        std::process::exit(2)
    });
    let c = collective(&args.backend).unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        std::process::exit(1)
    });
    let result = run(&*c, &args);
    fail_fast::exit_on_error(&*c, result);
    println!("rank {} of {}: dist selftest passed ({})", c.rank(), c.world_size(), args.backend);
}
