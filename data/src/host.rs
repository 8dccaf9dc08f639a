//! Host memory for batches: the buffers the loader fills and the trainer reads, reused from a
//! pool, allocated by whoever consumes them.
//!
//! The trainer copies each batch to the GPU; from page-locked (pinned) host memory that copy is
//! asynchronous. So the caller may supply the allocator ([`HostAlloc`]): the trainer hands out
//! pinned libtorch tensors, the loader transforms and tokenizes straight into them, and the
//! trainer gets its own type back from a batch ([`HostBuf::downcast_ref`]) to wrap it without a
//! copy. Without one, buffers are plain (8-byte aligned) vectors ([`VecAlloc`]).
//!
//! A batch's buffers go back to their loader's pool when the batch is dropped ([`PooledBuf`]),
//! so a steady run allocates only its first few batches.
//!
//! Allocation is fallible ([`AllocError`]): a batch buffer is sized by `data.batch_size` and the
//! image size, so an impossible request comes from the config and must end the loader with an
//! error that says so, not abort the process (as `vec!` does) or panic a loader thread.

use std::any::Any;
use std::sync::{Arc, Mutex, Weak};

/// Memory a [`HostAlloc`] hands out: at least the bytes asked for, 8-byte aligned (token ids are
/// `i64`). `Any`, so its owner can recognise its own type in a batch.
pub trait HostMemory: Any + Send {
    fn as_bytes(&self) -> &[u8];
    fn as_bytes_mut(&mut self) -> &mut [u8];
}

/// Allocates the loader's batch buffers (e.g. pinned host memory for fast host→device copies).
pub trait HostAlloc: Send + Sync {
    /// At least `bytes` bytes, 8-byte aligned; the contents need not be initialized to anything.
    /// An error when the memory cannot be had (the loader reports it, it does not retry).
    fn alloc(&self, bytes: usize) -> Result<HostBuf, AllocError>;
}

/// A [`HostAlloc`] could not hand out `bytes` bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot allocate {bytes} bytes of host memory: {message}")]
pub struct AllocError {
    /// The bytes asked for.
    pub bytes: usize,
    /// Why not (the allocator's own words).
    pub message: String,
}

impl AllocError {
    pub fn new(bytes: usize, message: impl Into<String>) -> Self {
        AllocError { bytes, message: message.into() }
    }
}

/// One allocation of a [`HostAlloc`].
pub struct HostBuf(Box<dyn HostMemory>);

impl HostBuf {
    pub fn new<M: HostMemory>(memory: M) -> Self {
        let buf = HostBuf(Box::new(memory));
        assert!(
            buf.as_bytes().as_ptr().align_offset(8) == 0,
            "HostAlloc returned memory that is not 8-byte aligned (token ids are i64)"
        );
        buf
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_bytes_mut()
    }

    /// The allocator's own memory type, if it is `M`.
    pub fn downcast_ref<M: HostMemory>(&self) -> Option<&M> {
        let any: &dyn Any = &*self.0;
        any.downcast_ref::<M>()
    }

    pub fn downcast_mut<M: HostMemory>(&mut self) -> Option<&mut M> {
        let any: &mut dyn Any = &mut *self.0;
        any.downcast_mut::<M>()
    }
}

impl std::fmt::Debug for HostBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostBuf({} bytes)", self.as_bytes().len())
    }
}

/// The default allocator: ordinary heap memory (`u64` words, so 8-byte aligned).
#[derive(Debug, Clone, Copy, Default)]
pub struct VecAlloc;

struct Words {
    words: Vec<u64>,
    len: usize,
}

impl HostMemory for Words {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `len <= 8 * words.len()` bytes of initialized `u64`s, viewed as bytes.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

impl Words {
    /// `bytes` zeroed bytes; an error instead of the abort `vec!` makes of a failed allocation.
    fn zeroed(bytes: usize) -> Result<Words, AllocError> {
        let mut words = Vec::new();
        words.try_reserve_exact(bytes.div_ceil(8)).map_err(|e| AllocError::new(bytes, e.to_string()))?;
        words.resize(bytes.div_ceil(8), 0u64);
        Ok(Words { words, len: bytes })
    }
}

impl HostAlloc for VecAlloc {
    fn alloc(&self, bytes: usize) -> Result<HostBuf, AllocError> {
        Ok(HostBuf::new(Words::zeroed(bytes)?))
    }
}

/// Buffers of one size from one allocator, handed out and taken back.
pub(crate) struct BufPool {
    alloc: Arc<dyn HostAlloc>,
    bytes: usize,
    /// How many idle buffers to keep; more are freed.
    keep: usize,
    free: Mutex<Vec<HostBuf>>,
}

impl BufPool {
    pub fn new(alloc: Arc<dyn HostAlloc>, bytes: usize, keep: usize) -> Arc<BufPool> {
        Arc::new(BufPool { alloc, bytes, keep, free: Mutex::new(Vec::new()) })
    }

    /// The size of every buffer of the pool.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A buffer of `self.bytes` bytes (reused or new), `used` of them in use; an error when a new
    /// one cannot be allocated.
    pub fn take(self: &Arc<Self>, used: usize) -> Result<PooledBuf, AllocError> {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let buf = match reused {
            Some(buf) => buf,
            None => {
                let buf = self.alloc.alloc(self.bytes)?;
                let got = buf.as_bytes().len();
                if got < self.bytes {
                    return Err(AllocError::new(self.bytes, format!("the allocator returned only {got} bytes")));
                }
                buf
            }
        };
        Ok(PooledBuf { buf: Some(buf), used: used.min(self.bytes), home: Arc::downgrade(self) })
    }

    fn give_back(&self, buf: HostBuf) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

/// A batch buffer: its first `len()` bytes are the batch's data; dropping it returns the memory
/// to the loader's pool (or frees it, once the loader is gone).
#[derive(Default)]
pub struct PooledBuf {
    buf: Option<HostBuf>,
    used: usize,
    home: Weak<BufPool>,
}

impl PooledBuf {
    /// A buffer of exactly `bytes`' contents outside any pool (tests, copies). A copy of memory
    /// that exists already: like `to_vec`, it aborts only when the process is out of memory.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut words = Words { words: vec![0u64; bytes.len().div_ceil(8)], len: bytes.len() };
        words.as_bytes_mut().copy_from_slice(bytes);
        PooledBuf { buf: Some(HostBuf::new(words)), used: bytes.len(), home: Weak::new() }
    }

    /// The same in memory from `alloc` (pinned memory, to check the device path as the loader feeds it).
    pub fn from_bytes_in(alloc: &dyn HostAlloc, bytes: &[u8]) -> Result<Self, AllocError> {
        let mut buf = alloc.alloc(bytes.len())?;
        buf.as_bytes_mut()[..bytes.len()].copy_from_slice(bytes);
        Ok(PooledBuf { buf: Some(buf), used: bytes.len(), home: Weak::new() })
    }

    /// The same for token ids.
    pub fn from_i64(values: &[i64]) -> Self {
        let mut buf = PooledBuf::from_bytes(&vec![0u8; values.len() * 8]);
        buf.as_i64_mut().copy_from_slice(values);
        buf
    }

    pub fn len(&self) -> usize {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Keep only the first `used` bytes as data.
    pub fn truncate(&mut self, used: usize) {
        self.used = self.used.min(used);
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b.as_bytes()[..self.used])
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        let used = self.used;
        self.buf.as_mut().map_or(&mut [], |b| &mut b.as_bytes_mut()[..used])
    }

    /// The data as `i64`s (token ids).
    pub fn as_i64(&self) -> &[i64] {
        let bytes = self.as_bytes();
        // SAFETY: HostBuf guarantees 8-byte alignment; any bit pattern is a valid i64.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<i64>(), bytes.len() / 8) }
    }

    pub fn as_i64_mut(&mut self) -> &mut [i64] {
        let bytes = self.as_bytes_mut();
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<i64>(), bytes.len() / 8) }
    }

    /// The whole allocation (possibly longer than the data), e.g. to find the trainer's own
    /// pinned tensor behind it.
    pub fn memory(&self) -> Option<&HostBuf> {
        self.buf.as_ref()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let (Some(buf), Some(pool)) = (self.buf.take(), self.home.upgrade()) {
            pool.give_back(buf);
        }
    }
}

impl Clone for PooledBuf {
    /// A copy of the data in plain memory, outside the pool.
    fn clone(&self) -> Self {
        PooledBuf::from_bytes(self.as_bytes())
    }
}

impl PartialEq for PooledBuf {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PooledBuf({} bytes)", self.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tagged(Vec<u64>, &'static str);
    impl HostMemory for Tagged {
        fn as_bytes(&self) -> &[u8] {
            // SAFETY: u64 words as bytes.
            unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 8) }
        }
        fn as_bytes_mut(&mut self) -> &mut [u8] {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 8) }
        }
    }
    struct TaggedAlloc(std::sync::atomic::AtomicUsize);
    impl HostAlloc for TaggedAlloc {
        fn alloc(&self, bytes: usize) -> Result<HostBuf, AllocError> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(HostBuf::new(Tagged(vec![0; bytes.div_ceil(8)], "mine")))
        }
    }

    #[test]
    fn buffers_come_back_to_the_pool_and_keep_the_callers_type() {
        let alloc = Arc::new(TaggedAlloc(Default::default()));
        let pool = BufPool::new(alloc.clone(), 100, 2);
        let mut a = pool.take(100).unwrap();
        a.as_bytes_mut()[..3].copy_from_slice(b"abc");
        assert_eq!(a.memory().unwrap().downcast_ref::<Tagged>().unwrap().1, "mine");
        assert!(a.memory().unwrap().downcast_ref::<Words>().is_none());
        let ptr = a.as_bytes().as_ptr();
        drop(a);
        let b = pool.take(40).unwrap();
        assert_eq!(b.as_bytes().as_ptr(), ptr, "the dropped buffer is reused");
        assert_eq!(b.len(), 40);
        let c = pool.take(100).unwrap();
        assert_eq!(alloc.0.load(std::sync::atomic::Ordering::Relaxed), 2);
        // Only `keep` idle buffers stay; a clone lives outside the pool.
        let d = c.clone();
        assert_eq!(d, c);
        assert!(d.memory().unwrap().downcast_ref::<Words>().is_some());
        drop((b, c, d, pool.take(1).unwrap()));
        assert_eq!(pool.free.lock().unwrap().len(), 2);
    }

    #[test]
    fn an_impossible_size_is_an_error_not_an_abort() {
        // Past `isize::MAX`: no allocator can, and `vec!` would abort the process.
        let huge = usize::MAX - 7;
        let err = VecAlloc.alloc(huge).unwrap_err();
        assert_eq!(err.bytes, huge);
        assert!(err.to_string().contains(&format!("{huge} bytes")), "{err}");
        // Within `isize::MAX`, but beyond any address space: the allocator itself says no.
        assert_eq!(VecAlloc.alloc(1 << 62).unwrap_err().bytes, 1 << 62);
        let pool = BufPool::new(Arc::new(VecAlloc), huge, 1);
        assert_eq!(pool.take(1).unwrap_err().bytes, huge);
        let ok = VecAlloc.alloc(13).unwrap();
        assert!(ok.as_bytes().len() == 13 && ok.as_bytes().iter().all(|&b| b == 0));
    }

    #[test]
    fn a_short_buffer_from_an_allocator_is_an_error() {
        struct Short;
        impl HostAlloc for Short {
            fn alloc(&self, bytes: usize) -> Result<HostBuf, AllocError> {
                VecAlloc.alloc(bytes / 2)
            }
        }
        let err = BufPool::new(Arc::new(Short), 64, 1).take(64).unwrap_err();
        assert_eq!(err.bytes, 64);
        assert!(err.message.contains("only 32 bytes"), "{err}");
    }

    #[test]
    fn token_views_are_aligned_i64() {
        let t = PooledBuf::from_i64(&[1, -2, 3]);
        assert_eq!(t.as_i64(), &[1, -2, 3]);
        assert_eq!(t.len(), 24);
    }
}
