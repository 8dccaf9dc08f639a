//! Where the ranks of a job meet: the TCPStore that rank 0 serves and every rank joins, found from
//! the launcher's environment as torchrun and OpenCLIP's `init_distributed_device` do.
//!
//! - `MASTER_ADDR` / `MASTER_PORT`, when set, win everywhere (torchrun always sets them).
//! - Slurm (`srun`): the first host of `SLURM_STEP_NODELIST` (or `SLURM_JOB_NODELIST`), compressed
//!   forms such as `gpu[001-004,007]` expanded; the port is derived from `SLURM_JOB_ID` and
//!   `SLURM_STEP_ID`, so two jobs (or two steps of one job) sharing a node do not collide and every
//!   rank of one step computes the same port.
//! - OpenMPI (`mpirun`): the first host of the surrounding Slurm allocation when there is one, else
//!   this host when every rank is local; the port from OpenMPI's job id.
//!
//! [`join`] then connects to the store and waits until every rank has checked in, naming the ranks
//! that did not.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::c10d::Store;
use super::env::{Launcher, RankEnv};

/// Ports derived from a job id fall in `PORT_BASE .. PORT_BASE + PORT_SPAN`: below Linux's ephemeral
/// range (32768+), so an outgoing connection never holds the port rank 0 needs.
const PORT_BASE: u32 = 10_000;
const PORT_SPAN: u32 = 20_000;

/// The address of the job's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    pub host: String,
    pub port: u16,
    /// Where each part came from, for error messages (`MASTER_ADDR`, `SLURM_JOB_NODELIST`, ...).
    pub source: String,
    /// torchrun's agent already serves the store at this address: rank 0 connects as a client.
    pub agent_store: bool,
}

/// Works out the store address of a multi-rank job from environment variables read through `lookup`.
pub fn master_from_lookup(env: &RankEnv, lookup: impl Fn(&str) -> Option<String>) -> Result<Master> {
    let agent_store = lookup("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let (host, host_source) = match lookup("MASTER_ADDR").filter(|s| !s.is_empty()) {
        Some(h) => (h, "MASTER_ADDR".to_string()),
        None => match env.launcher {
            Launcher::Slurm => {
                let (var, list) = nodelist(&lookup).context("srun set no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST")?;
                (first_host(&list).with_context(|| format!("{var}={list:?}"))?, var.to_string())
            }
            Launcher::OpenMpi => match nodelist(&lookup) {
                Some((var, list)) => (first_host(&list).with_context(|| format!("{var}={list:?}"))?, var.to_string()),
                None if env.local_world_size == env.world_size => ("127.0.0.1".to_string(), "all ranks on this host".into()),
                None => bail!(
                    "mpirun started ranks on several hosts: set MASTER_ADDR to rank 0's host (`mpirun -x MASTER_ADDR=...`)"
                ),
            },
            Launcher::Torchrun => bail!("torchrun-style launch (RANK/WORLD_SIZE) without MASTER_ADDR"),
            Launcher::Single => ("127.0.0.1".to_string(), "one process".into()),
        },
    };
    let (port, port_source) = match lookup("MASTER_PORT").filter(|s| !s.is_empty()) {
        Some(p) => (
            p.trim().parse::<u16>().with_context(|| format!("MASTER_PORT={p:?} is not a port number"))?,
            "MASTER_PORT".to_string(),
        ),
        None => {
            let id_var = ["SLURM_JOB_ID", "OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_ess_jobid"]
                .into_iter()
                .find(|v| lookup(v).is_some());
            match (env.launcher, id_var) {
                (Launcher::Torchrun, _) => bail!("torchrun-style launch (RANK/WORLD_SIZE) without MASTER_PORT"),
                (_, Some(var)) => {
                    let id = lookup(var).unwrap_or_default();
                    // Two `srun` steps of one job may run at once (an eval beside the training):
                    // each step gets its own port. A step id that is not a number (`batch`) adds nothing.
                    let step = (var == "SLURM_JOB_ID").then(|| lookup("SLURM_STEP_ID")).flatten();
                    match step.as_deref().and_then(|s| s.trim().parse::<u64>().ok()) {
                        Some(n) => (port_from_job_step(&id, n), format!("derived from {var}={id}, SLURM_STEP_ID={n}")),
                        None => (port_from_job_id(&id), format!("derived from {var}={id}")),
                    }
                }
                (_, None) => bail!("no MASTER_PORT and no job id to derive a port from: set MASTER_PORT"),
            }
        }
    };
    Ok(Master { host, port, source: format!("host from {host_source}, port {port_source}"), agent_store })
}

/// A port in `PORT_BASE..PORT_BASE + PORT_SPAN` from a job id (any string; digits are used as a number).
pub fn port_from_job_id(id: &str) -> u16 {
    let n: u64 = match id.trim().parse::<u64>() {
        Ok(n) => n,
        // OpenMPI job ids may be large or not numeric: hash them (FNV-1a).
        Err(_) => id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3)),
    };
    (PORT_BASE as u64 + n % PORT_SPAN as u64) as u16
}

/// [`port_from_job_id`] moved by `step` × a prime: step 0 keeps the job's port, and the steps of
/// one job get distinct ports (for fewer than `PORT_SPAN` / gcd steps, i.e. all of them).
pub fn port_from_job_step(id: &str, step: u64) -> u16 {
    const STEP_STRIDE: u64 = 7_919;
    let base = (port_from_job_id(id) as u32 - PORT_BASE) as u64;
    (PORT_BASE as u64 + (base + step % PORT_SPAN as u64 * STEP_STRIDE) % PORT_SPAN as u64) as u16
}

fn nodelist(lookup: &impl Fn(&str) -> Option<String>) -> Option<(&'static str, String)> {
    ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"]
        .into_iter()
        .find_map(|v| lookup(v).filter(|s| !s.is_empty()).map(|s| (v, s)))
}

fn first_host(list: &str) -> Result<String> {
    expand_nodelist(list)?.into_iter().next().context("empty node list")
}

/// Expands a Slurm host list (`scontrol show hostnames`): `gpu[001-003,007],login1` →
/// `gpu001 gpu002 gpu003 gpu007 login1`. Several bracket groups in one name multiply out
/// (`r[1-2]n[1-2]` → `r1n1 r1n2 r2n1 r2n2`); zero padding follows the lower bound's width.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>> {
    let mut hosts = Vec::new();
    for item in split_top_level(list)? {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let mut names = vec![String::new()];
        let mut rest = item;
        while !rest.is_empty() {
            match rest.find('[') {
                None => {
                    names.iter_mut().for_each(|n| n.push_str(rest));
                    rest = "";
                }
                Some(open) => {
                    let close = rest[open..]
                        .find(']')
                        .map(|c| open + c)
                        .with_context(|| format!("unclosed `[` in {item:?}"))?;
                    let prefix = &rest[..open];
                    let choices = expand_ranges(&rest[open + 1..close]).with_context(|| format!("in {item:?}"))?;
                    names = names.iter().flat_map(|n| choices.iter().map(move |c| format!("{n}{prefix}{c}"))).collect();
                    rest = &rest[close + 1..];
                }
            }
        }
        hosts.extend(names);
    }
    if hosts.is_empty() {
        bail!("no hosts in node list {list:?}");
    }
    Ok(hosts)
}

/// Splits at commas outside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, ch) in list.char_indices() {
        match ch {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth < 0 {
                    bail!("unbalanced `]` in node list {list:?}");
                }
            }
            ',' if depth == 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        bail!("unbalanced `[` in node list {list:?}");
    }
    out.push(&list[start..]);
    Ok(out)
}

/// `001-003,007` → `001 002 003 007`.
fn expand_ranges(spec: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((lo, hi)) => {
                let width = lo.len();
                let (a, b): (u64, u64) = (
                    lo.parse().with_context(|| format!("bad range start {lo:?}"))?,
                    hi.parse().with_context(|| format!("bad range end {hi:?}"))?,
                );
                if b < a {
                    bail!("range {part:?} runs backwards");
                }
                out.extend((a..=b).map(|n| format!("{n:0width$}")));
            }
            None if !part.is_empty() && part.bytes().all(|c| c.is_ascii_digit()) => out.push(part.to_string()),
            None => bail!("bad range {part:?}"),
        }
    }
    Ok(out)
}

/// Connects this rank to the job's store and waits until all ranks have checked in (each sets
/// `joined/{rank}`), or until `timeout`: then the error names the ranks that never came.
pub fn join(env: &RankEnv, master: &Master, timeout: Duration) -> Result<Store> {
    let serve = env.rank == 0 && !master.agent_store;
    let store = Store::tcp(&master.host, master.port, serve, env.world_size, timeout).with_context(|| {
        if serve {
            format!("rank 0: cannot serve the job's TCPStore on port {} ({})", master.port, master.source)
        } else {
            format!(
                "rank {}: cannot reach the job's TCPStore at {}:{} ({})",
                env.rank, master.host, master.port, master.source
            )
        }
    })?;
    // torchrun's agent store outlives restarts: keep each attempt's keys apart, as torch does.
    let store = match (master.agent_store, std::env::var("TORCHELASTIC_RESTART_COUNT")) {
        (true, Ok(n)) => store.prefixed(&format!("/ferroclip/attempt_{n}"))?,
        _ => store,
    };
    store.set(&format!("joined/{}", env.rank), b"1")?;
    let count = store.add("joined", 1)? as usize;
    if count > env.world_size {
        bail!(
            "rank {}: {count} processes joined the store at {}:{} for a job of {}: another job uses this port \
             (set MASTER_PORT)",
            env.rank,
            master.host,
            master.port,
            env.world_size
        );
    }
    if count == env.world_size {
        store.set("joined/all", b"1")?;
    }
    // Waits up to the store's timeout.
    if store.get("joined/all").is_err() {
        let mut missing = Vec::new();
        for r in 0..env.world_size {
            if !store.contains(&format!("joined/{r}"))? {
                missing.push(r.to_string());
            }
        }
        bail!(
            "rank {}: rank(s) {} did not join the job's store at {}:{} within {} s (dist.timeout_s)",
            env.rank,
            missing.join(", "),
            master.host,
            master.port,
            timeout.as_secs()
        );
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(launcher: Launcher, rank: usize, world: usize, local_world: usize) -> RankEnv {
        RankEnv { rank, world_size: world, local_rank: rank % local_world, local_world_size: local_world, launcher }
    }

    fn master(e: &RankEnv, pairs: &[(&str, &str)]) -> Result<Master> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        master_from_lookup(e, |k| map.get(k).cloned())
    }

    #[test]
    fn nodelists_expand_like_scontrol_show_hostnames() {
        assert_eq!(expand_nodelist("gpu[001-004,007]").unwrap(), ["gpu001", "gpu002", "gpu003", "gpu004", "gpu007"]);
        assert_eq!(expand_nodelist("node7").unwrap(), ["node7"]);
        assert_eq!(expand_nodelist("a[1-2],b,c[09-10]").unwrap(), ["a1", "a2", "b", "c09", "c10"]);
        assert_eq!(expand_nodelist("r[1-2]n[1-2]").unwrap(), ["r1n1", "r1n2", "r2n1", "r2n2"]);
        assert_eq!(expand_nodelist("x-[8-9]-ib").unwrap(), ["x-8-ib", "x-9-ib"]);
        assert!(expand_nodelist("gpu[001-").is_err());
        assert!(expand_nodelist("gpu[3-1]").is_err());
        assert!(expand_nodelist("").is_err());
    }

    #[test]
    fn slurm_master_is_the_first_node_and_the_port_follows_the_job() {
        let e = env(Launcher::Slurm, 3, 16, 8);
        let m = master(&e, &[("SLURM_JOB_NODELIST", "gpu[003-004]"), ("SLURM_JOB_ID", "123456")]).unwrap();
        assert_eq!((m.host.as_str(), m.port), ("gpu003", 10_000 + (123_456 % 20_000) as u16));
        // The step's own node list wins over the allocation's.
        let m = master(
            &e,
            &[("SLURM_JOB_NODELIST", "gpu[001-004]"), ("SLURM_STEP_NODELIST", "gpu[003-004]"), ("SLURM_JOB_ID", "1")],
        )
        .unwrap();
        assert_eq!(m.host, "gpu003");
        // MASTER_ADDR / MASTER_PORT override.
        let m = master(
            &e,
            &[
                ("SLURM_JOB_NODELIST", "gpu1"),
                ("SLURM_JOB_ID", "1"),
                ("MASTER_ADDR", "10.0.0.1"),
                ("MASTER_PORT", "21817"),
            ],
        )
        .unwrap();
        assert_eq!((m.host.as_str(), m.port), ("10.0.0.1", 21817));
        assert!(master(&e, &[("SLURM_JOB_ID", "1")]).is_err(), "no node list");
        // Each srun step of a job has its own port; step 0 keeps the job's.
        let step = |s: &str| {
            master(&e, &[("SLURM_JOB_NODELIST", "gpu1"), ("SLURM_JOB_ID", "123456"), ("SLURM_STEP_ID", s)])
                .unwrap()
                .port
        };
        assert_eq!(step("0"), 10_000 + (123_456 % 20_000) as u16);
        assert_eq!(step("batch"), step("0"), "a step id that is not a number adds nothing");
        let ports: std::collections::BTreeSet<u16> = (0..64).map(|s| step(&s.to_string())).collect();
        assert_eq!(ports.len(), 64, "steps of one job share a port");
        assert!(ports.iter().all(|&p| (PORT_BASE..PORT_BASE + PORT_SPAN).contains(&(p as u32))));
        let err = master(&e, &[("SLURM_JOB_NODELIST", "gpu1"), ("MASTER_PORT", "http")]).unwrap_err();
        assert!(format!("{err:#}").contains("MASTER_PORT"), "{err:#}");
    }

    #[test]
    fn mpirun_on_one_host_uses_loopback_and_needs_master_addr_across_hosts() {
        let one_host = env(Launcher::OpenMpi, 1, 4, 4);
        let m = master(&one_host, &[("OMPI_MCA_ess_base_jobid", "2747596801")]).unwrap();
        assert_eq!(m.host, "127.0.0.1");
        assert_eq!(m.port, port_from_job_id("2747596801"));
        let two_hosts = env(Launcher::OpenMpi, 1, 4, 2);
        assert!(master(&two_hosts, &[("OMPI_MCA_ess_base_jobid", "1")]).is_err());
        let m = master(&two_hosts, &[("SLURM_JOB_NODELIST", "n[5-6]"), ("SLURM_JOB_ID", "9")]).unwrap();
        assert_eq!(m.host, "n5");
    }

    #[test]
    fn torchrun_needs_master_addr_and_port_and_may_use_the_agent_store() {
        let e = env(Launcher::Torchrun, 0, 2, 2);
        assert!(master(&e, &[("MASTER_ADDR", "h")]).is_err());
        let m = master(&e, &[("MASTER_ADDR", "h"), ("MASTER_PORT", "29500"), ("TORCHELASTIC_USE_AGENT_STORE", "True")])
            .unwrap();
        assert_eq!((m.host.as_str(), m.port, m.agent_store), ("h", 29500, true));
    }

    #[test]
    fn derived_ports_stay_below_the_ephemeral_range() {
        for id in ["0", "1", "19999", "20000", "987654321", "not-a-number"] {
            let p = port_from_job_id(id) as u32;
            assert!((PORT_BASE..PORT_BASE + PORT_SPAN).contains(&p), "{id} -> {p}");
        }
        assert_ne!(port_from_job_id("100"), port_from_job_id("101"));
    }
}
