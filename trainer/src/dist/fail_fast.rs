//! Fail fast: when one rank fails, stop the whole job within seconds instead of leaving the other
//! ranks blocked forever in their next collective. The failing rank prints its error, then calls
//! [`Collective::abort`] (MPI_Abort under MPI, which makes `mpirun`/`srun` kill every rank).

use std::fmt::Display;

use super::Collective;

/// Unwraps `result`, or prints `error on rank R: ...` (with the whole context chain) to stderr and
/// aborts the job with exit status 1.
pub fn exit_on_error<T, E: Display>(collective: &dyn Collective, result: Result<T, E>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error on rank {} of {}: {e:#}", collective.rank(), collective.world_size());
            collective.abort(1)
        }
    }
}

/// Makes a panic on any thread abort the whole job: the default hook prints the panic message,
/// then MPI_Abort (when MPI is running) takes every rank down. Without MPI a panic already ends
/// the one process. Call once, early in `main`.
pub fn install_abort_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        #[cfg(feature = "mpi")]
        super::mpi::abort_world_if_initialized(101);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::single::Single;

    #[test]
    fn ok_values_pass_through() {
        assert_eq!(exit_on_error(&Single, Ok::<_, String>(7)), 7);
    }
}
