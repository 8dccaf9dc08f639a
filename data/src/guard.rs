//! The panic guard around the work on one sample or one shard: a panic in a decoder, a transform,
//! the tokenizer or the tar reader costs that sample (or shard), which is skipped and counted,
//! never the thread, the rank's stream or the run.
//!
//! A caught panic is reported by the caller's rate-limited skip warning; the process-wide panic
//! hook stays quiet for it (it would otherwise print a backtrace note per bad sample), and
//! prints every other panic as before.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Set while this thread runs guarded work.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

static QUIET_HOOK: Once = Once::new();

/// Install (once per process) a panic hook that is silent inside [`guarded`] and otherwise
/// delegates to the hook that was there before.
fn install_quiet_hook() {
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

/// The text of a panic payload (`panic!("...")` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Run `f`; a panic inside it becomes `Err(message)`.
pub fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_quiet_hook();
    let outer = GUARDED.with(|g| g.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    result.map_err(|p| panic_message(p.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_and_the_thread_goes_on() {
        assert_eq!(guarded(|| 3), Ok(3));
        assert_eq!(guarded(|| -> u8 { panic!("bad header {}", 7) }), Err("bad header 7".to_string()));
        let nested = guarded(|| guarded(|| -> () { panic!("inner") }).unwrap_err());
        assert_eq!(nested, Ok("inner".to_string()));
        assert!(!GUARDED.with(Cell::get));
    }
}
