//! Safe handles over c10d, the C++ library `torch.distributed` runs on, reached through the shim in
//! `trainer/csrc/` (`store.cpp`, `process_group.cpp`, `nccl_group.cpp`, `grad_buckets.cpp`): a
//! [`Store`] (TCPStore, HashStore, PrefixStore), a [`ProcessGroup`] (ProcessGroupGloo or
//! ProcessGroupNCCL), the [`Work`] of a collective in flight and [`GradBuckets`].
//!
//! Every call that can fail returns [`C10dError`] with c10d's message (a timeout, a lost peer, a
//! store that cannot be reached). Tensors handed to a collective must be dense and contiguous; the
//! [`Work`] keeps them alive until it completes.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

use tch::Tensor;

/// An error reported by c10d.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct C10dError(pub String);

type Result<T> = std::result::Result<T, C10dError>;

#[repr(C)]
struct RawStore(c_void);
#[repr(C)]
struct RawGroup(c_void);
#[repr(C)]
struct RawWork(c_void);
#[repr(C)]
struct RawBuckets(c_void);
type RawTensor = *mut torch_sys::C_tensor;

extern "C" {
    fn ferroclip_last_error() -> *const c_char;
    fn ferroclip_set_cpp_log_level(level: c_int);

    fn ferroclip_store_tcp(
        host: *const c_char,
        port: u16,
        is_server: bool,
        world: i64,
        timeout_ms: i64,
    ) -> *mut RawStore;
    fn ferroclip_store_hash() -> *mut RawStore;
    fn ferroclip_store_prefix(base: *mut RawStore, prefix: *const c_char) -> *mut RawStore;
    fn ferroclip_store_clone(s: *mut RawStore) -> *mut RawStore;
    fn ferroclip_store_port(s: *mut RawStore) -> c_int;
    fn ferroclip_store_set_timeout(s: *mut RawStore, timeout_ms: i64) -> c_int;
    fn ferroclip_store_set(s: *mut RawStore, key: *const c_char, data: *const u8, len: usize) -> c_int;
    fn ferroclip_store_get(s: *mut RawStore, key: *const c_char, data: *mut *mut u8, len: *mut usize) -> c_int;
    fn ferroclip_store_add(s: *mut RawStore, key: *const c_char, delta: i64, value: *mut i64) -> c_int;
    fn ferroclip_store_check(s: *mut RawStore, key: *const c_char, present: *mut bool) -> c_int;
    fn ferroclip_bytes_free(data: *mut u8);
    fn ferroclip_store_free(s: *mut RawStore);

    fn ferroclip_group_gloo(
        s: *mut RawStore,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        ifnames: *const c_char,
    ) -> *mut RawGroup;
    fn ferroclip_nccl_compiled() -> bool;
    fn ferroclip_group_nccl(
        s: *mut RawStore,
        rank: c_int,
        world: c_int,
        timeout_ms: i64,
        device: c_int,
    ) -> *mut RawGroup;
    fn ferroclip_group_name(g: *mut RawGroup) -> *const c_char;
    fn ferroclip_all_reduce_sum(g: *mut RawGroup, t: RawTensor) -> *mut RawWork;
    fn ferroclip_all_gather(g: *mut RawGroup, input: RawTensor, out: RawTensor) -> *mut RawWork;
    fn ferroclip_reduce_scatter_sum(g: *mut RawGroup, input: RawTensor, out: RawTensor) -> *mut RawWork;
    fn ferroclip_broadcast(g: *mut RawGroup, t: RawTensor, root: c_int) -> *mut RawWork;
    fn ferroclip_barrier(g: *mut RawGroup) -> *mut RawWork;
    fn ferroclip_work_wait(w: *mut RawWork) -> c_int;
    fn ferroclip_work_free(w: *mut RawWork);
    fn ferroclip_group_abort(g: *mut RawGroup);
    fn ferroclip_group_free(g: *mut RawGroup);

    fn ferroclip_buckets_new(
        g: *mut RawGroup,
        views: *const RawTensor,
        n_buckets: usize,
        params: *const RawTensor,
        param_bucket: *const i64,
        n_params: usize,
    ) -> *mut RawBuckets;
    fn ferroclip_buckets_arm(b: *mut RawBuckets);
    fn ferroclip_buckets_finish(b: *mut RawBuckets, early: *mut usize) -> c_int;
    fn ferroclip_buckets_free(b: *mut RawBuckets);
}

fn last_error() -> C10dError {
    // SAFETY: the shim returns a NUL-terminated thread-local string, valid until the next failing call.
    C10dError(unsafe { CStr::from_ptr(ferroclip_last_error()) }.to_string_lossy().into_owned())
}

fn check(rc: c_int) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(last_error())
    }
}

fn non_null<T>(p: *mut T) -> Result<NonNull<T>> {
    NonNull::new(p).ok_or_else(last_error)
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL bytes in keys, hosts and names")
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// The raw `torch::Tensor*` of `t`, for the shim. The shim copies the handle (a reference count).
fn raw(t: &Tensor) -> RawTensor {
    t.as_ptr() as RawTensor
}

/// A c10d key-value store. Operations of one `Store` are serialized (TCPStore holds a lock per
/// client); give each thread its own with [`Store::clone_client`].
pub struct Store(NonNull<RawStore>);

// SAFETY: c10d stores are safe to use from any thread (TCPStore serializes a client's operations).
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// A TCPStore. The server (`is_server`, rank 0) listens on `port` (0: a free one, see
    /// [`Store::port`]); clients connect to `host:port`, retrying until `timeout`, which also bounds
    /// every later [`Store::get`].
    pub fn tcp(host: &str, port: u16, is_server: bool, world: usize, timeout: Duration) -> Result<Store> {
        let h = cstr(host);
        // SAFETY: `h` outlives the call.
        non_null(unsafe { ferroclip_store_tcp(h.as_ptr(), port, is_server, world as i64, millis(timeout)) }).map(Store)
    }

    /// An in-process store, for a one-rank job.
    pub fn hash() -> Result<Store> {
        // SAFETY: no arguments.
        non_null(unsafe { ferroclip_store_hash() }).map(Store)
    }

    /// This store with every key under `prefix` (each process group gets its own key space).
    pub fn prefixed(&self, prefix: &str) -> Result<Store> {
        let p = cstr(prefix);
        // SAFETY: `self.0` is a live store; `p` outlives the call.
        non_null(unsafe { ferroclip_store_prefix(self.0.as_ptr(), p.as_ptr()) }).map(Store)
    }

    /// Another client of the same store, with its own connection.
    pub fn clone_client(&self) -> Result<Store> {
        // SAFETY: `self.0` is a live store.
        non_null(unsafe { ferroclip_store_clone(self.0.as_ptr()) }).map(Store)
    }

    /// The TCP port of a TCPStore.
    pub fn port(&self) -> Option<u16> {
        // SAFETY: `self.0` is a live store.
        let p = unsafe { ferroclip_store_port(self.0.as_ptr()) };
        u16::try_from(p).ok()
    }

    /// How long [`Store::get`] waits for a key that is not there yet.
    pub fn set_timeout(&self, timeout: Duration) -> Result<()> {
        // SAFETY: `self.0` is a live store.
        check(unsafe { ferroclip_store_set_timeout(self.0.as_ptr(), millis(timeout)) })
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = cstr(key);
        // SAFETY: `k` and `value` outlive the call; the shim copies them.
        check(unsafe { ferroclip_store_set(self.0.as_ptr(), k.as_ptr(), value.as_ptr(), value.len()) })
    }

    /// The value of `key`, waiting for it up to the store's timeout.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let k = cstr(key);
        let mut data: *mut u8 = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: out-pointers are valid; on success `data` is a malloc'ed buffer of `len` bytes.
        check(unsafe { ferroclip_store_get(self.0.as_ptr(), k.as_ptr(), &mut data, &mut len) })?;
        // SAFETY: see above; freed right after copying.
        let v = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
        unsafe { ferroclip_bytes_free(data) };
        Ok(v)
    }

    /// Adds `delta` to the integer at `key` (0 when absent) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = cstr(key);
        let mut v = 0i64;
        // SAFETY: valid out-pointer.
        check(unsafe { ferroclip_store_add(self.0.as_ptr(), k.as_ptr(), delta, &mut v) })?;
        Ok(v)
    }

    /// Whether `key` is set, without waiting.
    pub fn contains(&self, key: &str) -> Result<bool> {
        let k = cstr(key);
        let mut present = false;
        // SAFETY: valid out-pointer.
        check(unsafe { ferroclip_store_check(self.0.as_ptr(), k.as_ptr(), &mut present) })?;
        Ok(present)
    }

    fn raw(&self) -> *mut RawStore {
        self.0.as_ptr()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: owned handle, freed once.
        unsafe { ferroclip_store_free(self.0.as_ptr()) }
    }
}

/// Unless `TORCH_CPP_LOG_LEVEL` says otherwise, libtorch logs errors only: when a peer dies, c10d
/// would print a warning with a C++ backtrace for every store call that fails on the way down, next to
/// the one error message that names the rank and the operation.
pub fn quiet_cpp_warnings() {
    if std::env::var_os("TORCH_CPP_LOG_LEVEL").is_none() {
        // SAFETY: sets an int flag; c10 reads it when logging.
        unsafe { ferroclip_set_cpp_log_level(2) }
    }
}

/// Whether this build has ProcessGroupNCCL (every build against a libtorch with CUDA).
pub fn nccl_compiled() -> bool {
    // SAFETY: no arguments.
    unsafe { ferroclip_nccl_compiled() }
}

/// One c10d process group over all ranks of the job.
pub struct ProcessGroup {
    raw: NonNull<RawGroup>,
    name: String,
}

// SAFETY: c10d backends accept collectives from any thread; the trainer issues them from one.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// ProcessGroupGloo: connects every rank through `store` (all must call this), collectives
    /// time out after `timeout`. `ifnames` is `GLOO_SOCKET_IFNAME` (comma-separated interfaces).
    pub fn gloo(store: &Store, rank: usize, world: usize, timeout: Duration, ifnames: Option<&str>) -> Result<Self> {
        let ifn = cstr(ifnames.unwrap_or(""));
        // SAFETY: live store; `ifn` outlives the call.
        let raw = non_null(unsafe {
            ferroclip_group_gloo(store.raw(), rank as c_int, world as c_int, millis(timeout), ifn.as_ptr())
        })?;
        Ok(Self::named(raw))
    }

    /// ProcessGroupNCCL on CUDA device `device` (made this process's current device).
    pub fn nccl(store: &Store, rank: usize, world: usize, timeout: Duration, device: usize) -> Result<Self> {
        // SAFETY: live store.
        let raw = non_null(unsafe {
            ferroclip_group_nccl(store.raw(), rank as c_int, world as c_int, millis(timeout), device as c_int)
        })?;
        Ok(Self::named(raw))
    }

    fn named(raw: NonNull<RawGroup>) -> Self {
        // SAFETY: live group; the name is copied at once.
        let name = unsafe { CStr::from_ptr(ferroclip_group_name(raw.as_ptr())) }.to_string_lossy().into_owned();
        ProcessGroup { raw, name }
    }

    /// The backend's name (`gloo`, `nccl`).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn work(&self, w: *mut RawWork) -> Result<Work> {
        non_null(w).map(|raw| Work { raw })
    }

    /// Starts summing `t` over ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Work> {
        // SAFETY: live group; the shim holds a reference to `t` until the work is freed.
        self.work(unsafe { ferroclip_all_reduce_sum(self.raw.as_ptr(), raw(t)) })
    }

    /// Starts gathering every rank's `input` ([n, ...]) into `out` ([world·n, ...]), rank order.
    pub fn all_gather(&self, input: &Tensor, out: &Tensor) -> Result<Work> {
        // SAFETY: as above.
        self.work(unsafe { ferroclip_all_gather(self.raw.as_ptr(), raw(input), raw(out)) })
    }

    /// Starts the sum over ranks of `input` ([world·n, ...]) whose rows `rank·n..(rank+1)·n` go to `out`.
    pub fn reduce_scatter_sum(&self, input: &Tensor, out: &Tensor) -> Result<Work> {
        // SAFETY: as above.
        self.work(unsafe { ferroclip_reduce_scatter_sum(self.raw.as_ptr(), raw(input), raw(out)) })
    }

    /// Starts overwriting `t` with rank `root`'s.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<Work> {
        // SAFETY: as above.
        self.work(unsafe { ferroclip_broadcast(self.raw.as_ptr(), raw(t), root as c_int) })
    }

    pub fn barrier(&self) -> Result<Work> {
        // SAFETY: live group.
        self.work(unsafe { ferroclip_barrier(self.raw.as_ptr()) })
    }

    /// Aborts pending collectives without waiting for the peers.
    pub fn abort(&self) {
        // SAFETY: live group.
        unsafe { ferroclip_group_abort(self.raw.as_ptr()) }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: owned handle, freed once.
        unsafe { ferroclip_group_free(self.raw.as_ptr()) }
    }
}

/// A collective in flight.
pub struct Work {
    raw: NonNull<RawWork>,
}

impl Work {
    /// Waits until the collective has completed (Gloo), or is ordered before later work on the
    /// current CUDA stream (NCCL).
    pub fn wait(self) -> Result<()> {
        // SAFETY: live work, freed by Drop.
        check(unsafe { ferroclip_work_wait(self.raw.as_ptr()) })
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: owned handle, freed once.
        unsafe { ferroclip_work_free(self.raw.as_ptr()) }
    }
}

/// Post-accumulate-grad hooks that all-reduce gradient buckets during backward (`grad_buckets.cpp`).
pub struct GradBuckets {
    raw: NonNull<RawBuckets>,
}

impl GradBuckets {
    /// `views`: the bucket slices of the flat gradient buffers, in launch order; `params[i]` is in
    /// bucket `bucket_of[i]`. The hooks stay on the parameters until this is dropped.
    pub fn new(group: &ProcessGroup, views: &[Tensor], params: &[Tensor], bucket_of: &[i64]) -> Result<Self> {
        assert_eq!(params.len(), bucket_of.len(), "one bucket index per parameter");
        let v: Vec<RawTensor> = views.iter().map(raw).collect();
        let p: Vec<RawTensor> = params.iter().map(raw).collect();
        // SAFETY: the arrays outlive the call; the shim copies the tensor handles.
        let raw = non_null(unsafe {
            ferroclip_buckets_new(group.raw.as_ptr(), v.as_ptr(), v.len(), p.as_ptr(), bucket_of.as_ptr(), p.len())
        })?;
        Ok(GradBuckets { raw })
    }

    /// The next backward pass completes the gradients: all-reduce each bucket as it completes.
    pub fn arm(&self) {
        // SAFETY: live handle.
        unsafe { ferroclip_buckets_arm(self.raw.as_ptr()) }
    }

    /// All-reduces the buckets not started yet, waits for all; returns how many had been started
    /// during the armed backward pass.
    pub fn finish(&self) -> Result<usize> {
        let mut early = 0usize;
        // SAFETY: live handle, valid out-pointer.
        check(unsafe { ferroclip_buckets_finish(self.raw.as_ptr(), &mut early) })?;
        Ok(early)
    }
}

impl Drop for GradBuckets {
    fn drop(&mut self) {
        // SAFETY: owned handle; removes the hooks, then frees.
        unsafe { ferroclip_buckets_free(self.raw.as_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn hash_store_round_trips_and_counts() {
        let s = Store::hash().unwrap();
        s.set("a", b"hello").unwrap();
        assert_eq!(s.get("a").unwrap(), b"hello");
        assert_eq!(s.add("n", 2).unwrap(), 2);
        assert_eq!(s.add("n", 3).unwrap(), 5);
        assert!(s.contains("a").unwrap());
        assert!(!s.contains("b").unwrap());
        let p = s.prefixed("g1").unwrap();
        p.set("a", b"other").unwrap();
        assert_eq!(s.get("a").unwrap(), b"hello", "a prefixed store has its own keys");
        assert_eq!(p.get("a").unwrap(), b"other");
    }

    #[test]
    fn a_missing_key_times_out_with_cs_message() {
        let s = Store::hash().unwrap();
        s.set_timeout(Duration::from_millis(200)).unwrap();
        let e = s.get("never").unwrap_err();
        assert!(e.0.to_lowercase().contains("timeout") || e.0.contains("Timed out") || e.0.contains("wait"), "{e}");
    }

    #[test]
    fn nccl_is_compiled_in_and_reports_a_missing_gpu_clearly() {
        // Every build against the CUDA wheel has ProcessGroupNCCL; without a GPU, creating one is an
        // error with c10d's message, not a crash; with one, a one-rank group all-reduces on it.
        assert!(nccl_compiled(), "this build has no ProcessGroupNCCL");
        let store = Store::hash().unwrap();
        match ProcessGroup::nccl(&store, 0, 1, Duration::from_secs(30), 0) {
            Ok(g) => {
                assert!(tch::Cuda::is_available());
                assert_eq!(g.name(), "nccl");
                let t = Tensor::ones([4], (Kind::Float, Device::Cuda(0)));
                g.all_reduce_sum(&t).unwrap().wait().unwrap();
                assert_eq!(t.sum(Kind::Float).double_value(&[]), 4.0);
            }
            Err(e) => {
                assert!(!tch::Cuda::is_available(), "a GPU is visible, yet: {e}");
                assert!(!e.0.is_empty());
            }
        }
    }

    #[test]
    fn one_rank_gloo_group_runs_every_collective() {
        let store = Store::hash().unwrap();
        let g = ProcessGroup::gloo(&store, 0, 1, Duration::from_secs(10), None).unwrap();
        assert_eq!(g.name(), "gloo");
        let t = Tensor::from_slice(&[1.0f32, 2.0]);
        g.all_reduce_sum(&t).unwrap().wait().unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0]);
        let out = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        g.all_gather(&t, &out).unwrap().wait().unwrap();
        assert!(out.equal(&t));
        let rs = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        g.reduce_scatter_sum(&t, &rs).unwrap().wait().unwrap();
        assert!(rs.equal(&t));
        g.broadcast(&t, 0).unwrap().wait().unwrap();
        g.barrier().unwrap().wait().unwrap();
    }
}
