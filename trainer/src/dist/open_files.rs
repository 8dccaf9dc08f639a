//! The open-file limit of a rank. Rank 0's store holds sockets from every rank's store clients, beside
//! Gloo's and NCCL's own, so at hundreds of ranks the usual soft limit (1024) runs out. At start each
//! rank raises its soft limit to the hard one, which needs no privilege; the hard limit is the
//! cluster's to set.

use std::io;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: `(before, after)` when it was lower.
pub fn raise_to_hard_limit() -> io::Result<Option<(u64, u64)>> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only the struct we pass, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur >= lim.rlim_max {
        return Ok(None);
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((before, lim.rlim_max)))
}
