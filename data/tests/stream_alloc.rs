//! A batch buffer that cannot be allocated is a loader error that names `data.batch_size` and
//! the bytes asked for: from `Loader::new` for the first buffers, as the stream's error for a
//! later one; never a panic of a loader thread or an abort of the process.

mod stream_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ferroclip_data::{AllocError, DataError, HostAlloc, HostBuf, Loader, Mode, VecAlloc};
use stream_support::*;

/// Plain memory for the first `grants` requests, then none.
struct RunsOut {
    grants: AtomicUsize,
}

impl HostAlloc for RunsOut {
    fn alloc(&self, bytes: usize) -> Result<HostBuf, AllocError> {
        match self.grants.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)) {
            Ok(_) => VecAlloc.alloc(bytes),
            Err(_) => Err(AllocError::new(bytes, "out of test memory")),
        }
    }
}

fn open_with(grants: usize, batch_size: usize, pattern: &str) -> Result<Loader, DataError> {
    let mut o = opts(0, 1, batch_size, Mode::Eval, Arc::new(FakeTransform::default()), None);
    o.host_alloc = Some(Arc::new(RunsOut { grants: AtomicUsize::new(grants) }));
    Loader::new(&cfg(), pattern, o)
}

#[test]
fn a_first_batch_buffer_that_cannot_be_allocated_fails_the_open_naming_the_batch_size() {
    let dir = tempdir("alloc-open");
    let pattern = dataset(&dir, 1, 4);
    // Images: 4 × 3 × SIZE² bytes; token ids: 4 × 8 × 8 bytes (ByteTokenizer's context is 8).
    for (grants, what, bytes) in [(0, "image", 4 * 3 * SIZE * SIZE), (1, "token", 4 * 8 * 8)] {
        let err = open_with(grants, 4, &pattern).err().expect("the open must fail");
        let text = err.to_string();
        match &err {
            DataError::BatchBuffer { batch_size: 4, what: w, alloc } => {
                assert_eq!((*w, alloc.bytes), (what, bytes), "{text}");
            }
            other => panic!("not a batch buffer error: {other}"),
        }
        assert!(text.contains("data.batch_size") && text.contains(&format!("{bytes} bytes")), "{text}");
    }
}

#[test]
fn a_batch_size_no_memory_holds_is_an_error_with_plain_memory_too() {
    let dir = tempdir("alloc-huge");
    let pattern = dataset(&dir, 1, 4);
    let open = |batch_size| {
        let o = opts(0, 1, batch_size, Mode::Train, Arc::new(FakeTransform::default()), None);
        Loader::new(&cfg(), &pattern, o).err().expect("the open must fail")
    };
    // 2⁵⁸ · 3 · SIZE² bytes fit a usize, but no machine.
    let err = open(1 << 58);
    assert!(matches!(err, DataError::BatchBuffer { batch_size, .. } if batch_size == 1 << 58), "{err}");
    assert!(err.to_string().contains(&format!("batch of {} samples", 1u64 << 58)), "{err}");
    // 2⁶² · 3 · SIZE² bytes do not even fit a usize.
    let err = open(1 << 62);
    assert!(matches!(&err, DataError::Config(e) if e.key == "batch_size"), "{err}");
    assert!(err.to_string().starts_with("data.batch_size: "), "{err}");
}

#[test]
fn a_later_batch_buffer_that_cannot_be_allocated_ends_the_stream_with_that_error() {
    let dir = tempdir("alloc-later");
    let pattern = dataset(&dir, 1, 10);
    let (first, second, error) = within(60, move || {
        // The open takes one image and one token buffer; the first batch reuses them, and the
        // second needs new ones while the first is still held.
        let mut l = open_with(2, 2, &pattern).unwrap();
        let first = l.next_batch().map(|b| b.len);
        let second = l.next_batch().map(|b| b.len);
        (first, second, l.error().map(|e| e.to_string()))
    });
    assert_eq!(first, Some(2), "the batch finished before the failure still arrives");
    assert_eq!(second, None);
    let error = error.expect("the stream must say why it ended");
    let bytes = 2 * 3 * SIZE * SIZE;
    assert!(error.contains("data.batch_size") && error.contains(&format!("{bytes} bytes")), "{error}");
    assert!(!error.contains("panicked"), "{error}");
}
