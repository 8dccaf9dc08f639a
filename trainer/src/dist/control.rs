//! The control path: small messages between ranks that steer the job — the stop vote, step agreement,
//! every rank's data cursor, rank 0's checkpoint choice. They never take the device collectives: on a
//! GPU job those are NCCL, which takes CUDA tensors only, and a control message is host data. Every
//! backend offers this path (a Gloo group beside the NCCL one, as `torch.distributed.new_group(backend=
//! "gloo")` users do; MPI itself; one process trivially), always on host bytes.

use anyhow::{bail, Result};

/// Host-side messages between ranks. Collective calls: every rank calls the same method at the same
/// point, as with [`super::Collective`].
pub trait Control {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Every rank's `bytes` (any lengths), in rank order.
    fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>>;
    /// Rank `root`'s `bytes` on every rank (the others' `bytes` are ignored).
    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Vec<u8>;

    /// True on every rank when `flag` is true on at least one (the stop vote).
    fn any(&self, flag: bool) -> bool {
        self.all_gather_bytes(&[flag as u8]).iter().any(|b| b.first() == Some(&1))
    }

    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        self.all_gather_bytes(&value.to_le_bytes())
            .iter()
            .map(|b| u64::from_le_bytes(b.as_slice().try_into().expect("8 bytes from every rank")))
            .collect()
    }

    /// An error naming the ranks whose `value` differs from rank 0's (`what` says what it is).
    fn check_same_u64(&self, value: u64, what: &str) -> Result<()> {
        let all = self.all_gather_u64(value);
        let differ: Vec<String> =
            all.iter().enumerate().filter(|(_, v)| **v != all[0]).map(|(r, v)| format!("rank {r} has {v}")).collect();
        if !differ.is_empty() {
            bail!("ranks disagree on {what}: rank 0 has {}, {}", all[0], differ.join(", "));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{Arc, Barrier, Mutex};

    /// W ranks as threads sharing one mailbox: a Control to test the provided methods with.
    pub(crate) struct Threads {
        rank: usize,
        world: usize,
        slots: Arc<Mutex<Vec<Vec<u8>>>>,
        barrier: Arc<Barrier>,
    }

    pub(crate) fn threads(world: usize) -> Vec<Threads> {
        let slots = Arc::new(Mutex::new(vec![Vec::new(); world]));
        let barrier = Arc::new(Barrier::new(world));
        (0..world).map(|rank| Threads { rank, world, slots: slots.clone(), barrier: barrier.clone() }).collect()
    }

    impl Control for Threads {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
            self.slots.lock().unwrap()[self.rank] = bytes.to_vec();
            self.barrier.wait();
            let all = self.slots.lock().unwrap().clone();
            self.barrier.wait();
            all
        }
        fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Vec<u8> {
            self.all_gather_bytes(bytes)[root].clone()
        }
    }

    fn on_ranks<T: Send + 'static>(world: usize, f: impl Fn(Threads) -> T + Send + Sync + 'static) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = threads(world)
            .into_iter()
            .map(|t| {
                let f = f.clone();
                std::thread::spawn(move || f(t))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn one_rank_stopping_stops_all() {
        assert_eq!(on_ranks(3, |t| t.any(t.rank == 2)), vec![true; 3]);
        assert_eq!(on_ranks(3, |t| t.any(false)), vec![false; 3]);
    }

    #[test]
    fn a_rank_on_another_step_is_named() {
        let out =
            on_ranks(3, |t| t.check_same_u64(if t.rank == 1 { 7 } else { 8 }, "the step").map_err(|e| e.to_string()));
        for r in out {
            let e = r.unwrap_err();
            assert!(e.contains("rank 1 has 7") && e.contains("rank 0 has 8"), "{e}");
        }
        assert!(on_ranks(2, |t| t.check_same_u64(5, "the step").is_ok()).into_iter().all(|ok| ok));
    }
}
