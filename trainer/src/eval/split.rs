//! Evaluation shared by all ranks. The work is cut into units that do not depend on the number
//! of ranks — chunks of class names for the zero-shot classifier, batches of a folder's images,
//! whole shards — and unit `u` belongs to rank `u % world_size`. Each rank computes its units'
//! result rows, and [`Ranks::gather_rows`] hands every rank all units' rows in unit order. A unit
//! is computed the same way whichever rank owns it, so the results equal one process's, bit for
//! bit, and every rank has them (nobody waits while rank 0 works, and rank 0 logs them).

use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

use crate::dist::{preempt, Collective, Control};

/// The ranks evaluating together, and the device their tensors live on. Features and sums go
/// through the device `collective`; the stop vote and the row counts are control messages.
pub struct Ranks<'a> {
    pub collective: &'a dyn Collective,
    pub control: &'a dyn Control,
    pub device: Device,
}

impl Ranks<'_> {
    /// Whether this rank computes unit `u`.
    pub fn owns(&self, u: usize) -> bool {
        u % self.collective.world_size() == self.collective.rank()
    }

    pub fn is_main(&self) -> bool {
        self.collective.rank() == 0
    }

    /// Whether a stop signal (SIGTERM/SIGUSR1) reached any rank: the same answer on every rank.
    /// A collective: every rank calls it at the same point.
    pub fn any_stopped(&self, stop: &AtomicBool) -> bool {
        preempt::any_rank(stop.load(Ordering::Relaxed), self.control)
    }

    /// Every unit's rows on every rank, in unit order: `mine` holds this rank's units as
    /// `(unit, rows)` with rows `[n_u, row_shape...]` of `kind` (`n_u` may differ per unit, 0
    /// included). Returns the rows `[sum n_u, row_shape...]` on `self.device` and each unit's `n_u`.
    ///
    /// The counts are gathered on the control path, then one all-reduce of the rows, each unit's
    /// written by its owner into a zero tensor (adding zeros is exact, so no value changes on the
    /// way). `kind` is a floating-point kind: device collectives carry model data only.
    pub fn gather_rows(
        &self,
        num_units: usize,
        row_shape: &[i64],
        kind: Kind,
        mine: &[(usize, Tensor)],
    ) -> (Tensor, Vec<i64>) {
        let mut counts = vec![0i64; num_units];
        let mine_counts: Vec<u8> =
            mine.iter().flat_map(|(u, rows)| [*u as i64, rows.size()[0]]).flat_map(i64::to_le_bytes).collect();
        for bytes in self.control.all_gather_bytes(&mine_counts) {
            for pair in bytes.chunks_exact(16) {
                let u = i64::from_le_bytes(pair[..8].try_into().expect("8 bytes")) as usize;
                counts[u] = i64::from_le_bytes(pair[8..].try_into().expect("8 bytes"));
            }
        }
        let mut offsets = Vec::with_capacity(num_units);
        let mut total = 0i64;
        for &n in &counts {
            offsets.push(total);
            total += n;
        }
        let shape: Vec<i64> = std::iter::once(total).chain(row_shape.iter().copied()).collect();
        let mut all = Tensor::zeros(shape.as_slice(), (kind, self.device));
        for (u, rows) in mine {
            if rows.size()[0] > 0 {
                all.narrow(0, offsets[*u], rows.size()[0]).copy_(&rows.to_device(self.device).to_kind(kind));
            }
        }
        self.collective.all_reduce_sum(&mut all);
        (all, counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::single::Single;

    #[test]
    fn one_rank_owns_every_unit_and_gets_its_rows_back_in_unit_order() {
        let ranks = Ranks { collective: &Single, control: &Single, device: Device::Cpu };
        assert!((0..5).all(|u| ranks.owns(u)));
        let a = Tensor::from_slice(&[1.5f32, 2.0, 3.0, 4.0]).view([2, 2]);
        let c = Tensor::from_slice(&[5.0f32, 6.0]).view([1, 2]);
        let empty = Tensor::zeros([0, 2], (Kind::Float, Device::Cpu));
        // Given out of order, with an empty unit.
        let (rows, counts) = ranks.gather_rows(3, &[2], Kind::Float, &[(2, c), (0, a), (1, empty)]);
        assert_eq!(counts, [2, 0, 1]);
        assert_eq!(Vec::<f32>::try_from(rows.flatten(0, -1)).unwrap(), [1.5, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let (none, counts) = ranks.gather_rows(2, &[3], Kind::Double, &[]);
        assert_eq!((none.size(), counts), (vec![0, 3], vec![0, 0]));
    }
}
