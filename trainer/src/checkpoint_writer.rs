//! Checkpoints written in the background, so that rank 0 does not hold up every rank while a
//! 2 GB checkpoint goes to a network filesystem: the training thread copies the state to host
//! memory ([`Snapshot::take`]) and a thread writes the files ([`CheckpointDir::write`]: temp
//! file, fsync, rename, model file first, the manifest last; a step counts once its manifest
//! exists, and the thread verifies it from disk before dropping old checkpoints).
//!
//! At most one write is in flight. The next save, a preemption and the end of training wait for
//! it ([`CheckpointWriter::wait`]); a write that failed is an error there, naming the file. A
//! process killed while the thread writes leaves the previous checkpoint as the newest complete
//! one, exactly as a crash during a synchronous save does.

use std::thread::JoinHandle;

use anyhow::{anyhow, Context, Result};

use crate::checkpoint::{CheckpointDir, Saved, Snapshot};

/// Rank 0's checkpoint writer: one background write at a time.
pub struct CheckpointWriter {
    dir: CheckpointDir,
    keep: usize,
    in_flight: Option<(u64, JoinHandle<Result<Saved>>)>,
}

impl CheckpointWriter {
    /// Writes into `dir`, keeping the newest `keep` checkpoints (0 keeps all).
    pub fn new(dir: CheckpointDir, keep: usize) -> Self {
        Self { dir, keep, in_flight: None }
    }

    /// Starts writing `snapshot` on a thread, after waiting for the write before it (whose
    /// result this returns).
    pub fn start(&mut self, snapshot: Snapshot) -> Result<Option<Saved>> {
        let previous = self.wait()?;
        let (dir, keep, step) = (self.dir.clone(), self.keep, snapshot.step);
        let handle = std::thread::Builder::new()
            .name(format!("checkpoint-{step}"))
            .spawn(move || dir.write(&snapshot, keep))
            .context("starting the checkpoint writer thread")?;
        self.in_flight = Some((step, handle));
        Ok(previous)
    }

    /// The write in flight, if it has finished (without waiting); `None` while it runs.
    pub fn poll(&mut self) -> Result<Option<Saved>> {
        match &self.in_flight {
            Some((_, h)) if h.is_finished() => self.wait(),
            _ => Ok(None),
        }
    }

    /// Waits for the write in flight; `None` when there was none.
    pub fn wait(&mut self) -> Result<Option<Saved>> {
        let Some((step, handle)) = self.in_flight.take() else { return Ok(None) };
        let result = handle.join().map_err(|_| anyhow!("the thread writing the checkpoint of step {step} panicked"))?;
        result
            .with_context(|| format!("writing the checkpoint of step {step} in {}", self.dir.dir().display()))
            .map(Some)
    }

    /// Whether a write is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }
}

impl Drop for CheckpointWriter {
    /// Training ended by an error: still finish the checkpoint being written, so that it counts.
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            eprintln!("ferroclip: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tch::Tensor;

    use super::*;
    use crate::checkpoint;

    fn snapshot(step: u64, w: &Tensor) -> Snapshot {
        let model = vec![("w".to_string(), w.shallow_clone())];
        let state = vec![("exp_avg.w".to_string(), w * 2.0)];
        Snapshot::take(step, &model, &BTreeMap::new(), &state, &BTreeMap::new()).unwrap()
    }

    fn values(path: &std::path::Path) -> Vec<f32> {
        let (named, _) = checkpoint::read(path).unwrap();
        Vec::<f32>::try_from(&named[0].1).unwrap()
    }

    #[test]
    fn writes_the_values_of_the_snapshot_not_the_live_tensor() {
        let d = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::new(d.path().join("checkpoints"));
        let mut writer = CheckpointWriter::new(dir.clone(), 0);
        let mut w = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        assert!(writer.start(snapshot(1, &w)).unwrap().is_none());
        // Training goes on while the thread writes: an in-place update must not reach the file.
        let _ = w.fill_(9.0);
        let saved = writer.wait().unwrap().expect("the write of step 1");
        assert_eq!(saved.step, 1);
        assert!(!writer.busy());
        assert_eq!(values(&dir.model_path(1)), vec![1.0, 2.0, 3.0]);
        assert_eq!(values(&dir.state_path(1)), vec![2.0, 4.0, 6.0]);

        // The next save returns the previous one once it is on disk; keep = 0 keeps both.
        writer.start(snapshot(2, &w)).unwrap();
        let done = loop {
            if let Some(s) = writer.poll().unwrap() {
                break s;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(done.step, 2);
        assert_eq!(dir.complete_steps().unwrap(), vec![1, 2]);
        assert_eq!(values(&dir.model_path(2)), vec![9.0; 3]);
    }

    #[test]
    fn a_failed_write_is_an_error_naming_the_file_at_the_next_wait() {
        let d = tempfile::tempdir().unwrap();
        // The checkpoints "folder" is a file: creating it fails on the writer thread.
        let blocked = d.path().join("checkpoints");
        std::fs::write(&blocked, b"not a folder").unwrap();
        let mut writer = CheckpointWriter::new(CheckpointDir::new(&blocked), 0);
        writer.start(snapshot(7, &Tensor::from_slice(&[1.0f32]))).unwrap();
        let e = format!("{:#}", writer.start(snapshot(8, &Tensor::from_slice(&[1.0f32]))).unwrap_err());
        assert!(e.contains("step 7") && e.contains(&blocked.display().to_string()), "{e}");
        // The failure ends training: the next write was not started.
        assert!(writer.wait().unwrap().is_none());
    }
}
