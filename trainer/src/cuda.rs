//! The CUDA runtime pieces tch 0.24 does not bind, through the shim in `trainer/csrc/`: TF32 and cuDNN
//! benchmark mode (`backend_flags.cpp`), CUDA's sync debug mode (`sync_debug.cpp`), pinned host memory
//! and host-to-device copies on a side stream with events (`copy_stream.cpp`), and the caching
//! allocator's statistics (`allocator_stats.cpp`). Everything compiles in every build; without a GPU
//! the calls return an error or `None` (the trainer only makes them on a CUDA device).

use std::ffi::{c_char, c_int, CStr};
use std::ptr::NonNull;

use anyhow::{bail, Result};
use tch::{Device, Tensor};

type RawTensor = *mut torch_sys::C_tensor;

#[repr(C)]
struct RawCopyStream(std::ffi::c_void);
#[repr(C)]
struct RawEvent(std::ffi::c_void);

extern "C" {
    fn ferroclip_last_error() -> *const c_char;
    fn ferroclip_enable_tf32_and_cudnn_benchmark();
    fn ferroclip_backend_flags(tf32_matmul: *mut bool, tf32_cudnn: *mut bool, cudnn_benchmark: *mut bool);
    fn ferroclip_set_sync_debug_mode(level: c_int) -> c_int;
    fn ferroclip_sync_debug_mode() -> c_int;
    fn ferroclip_copy_stream_new(device: c_int) -> *mut RawCopyStream;
    fn ferroclip_copy_stream_free(s: *mut RawCopyStream);
    fn ferroclip_copy_stream_upload(
        s: *mut RawCopyStream,
        srcs: *const RawTensor,
        dsts: *mut RawTensor,
        n: usize,
    ) -> *mut RawEvent;
    fn ferroclip_event_query(e: *mut RawEvent) -> c_int;
    fn ferroclip_event_synchronize(e: *mut RawEvent) -> c_int;
    fn ferroclip_event_free(e: *mut RawEvent);
    fn ferroclip_pinned_empty(bytes: i64) -> RawTensor;
    fn ferroclip_cuda_memory_stats(
        device: c_int,
        allocated: *mut i64,
        peak_allocated: *mut i64,
        peak_reserved: *mut i64,
        num_alloc_retries: *mut i64,
    ) -> c_int;
    fn ferroclip_cuda_reset_peak_memory(device: c_int) -> c_int;
}

fn last_error() -> String {
    // SAFETY: the shim returns a NUL-terminated thread-local string, valid until the next failing call.
    unsafe { CStr::from_ptr(ferroclip_last_error()) }.to_string_lossy().into_owned()
}

fn raw(t: &Tensor) -> RawTensor {
    t.as_ptr() as RawTensor
}

/// TF32 for matmuls and cuDNN, and cuDNN benchmark mode, as OpenCLIP's `main.py` sets them on a GPU.
/// Process-wide; changes nothing on the CPU.
pub fn enable_tf32_and_cudnn_benchmark() {
    // SAFETY: sets flags of ATen's global context.
    unsafe { ferroclip_enable_tf32_and_cudnn_benchmark() }
}

/// `(tf32 matmul, tf32 cuDNN, cuDNN benchmark)` as set now.
pub fn backend_flags() -> (bool, bool, bool) {
    let (mut a, mut b, mut c) = (false, false, false);
    // SAFETY: reads flags of ATen's global context into the three locals.
    unsafe { ferroclip_backend_flags(&mut a, &mut b, &mut c) };
    (a, b, c)
}

/// CUDA's sync debug mode (`torch.cuda.set_sync_debug_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDebug {
    Off = 0,
    /// Every host synchronization warns.
    Warn = 1,
    /// Every host synchronization throws (the op fails with CUDA's message).
    Error = 2,
}

impl SyncDebug {
    /// `FERROCLIP_SYNC_DEBUG`: unset or empty = off, `warn` or `error`.
    pub fn from_env() -> Result<SyncDebug> {
        Self::parse(std::env::var("FERROCLIP_SYNC_DEBUG").ok().as_deref().unwrap_or(""))
    }

    pub fn parse(value: &str) -> Result<SyncDebug> {
        Ok(match value {
            "" | "off" | "0" => SyncDebug::Off,
            "warn" => SyncDebug::Warn,
            "error" => SyncDebug::Error,
            other => bail!("FERROCLIP_SYNC_DEBUG=`{other}` is not one of warn, error, off"),
        })
    }

    /// Sets the mode for the whole process; false when this libtorch has no CUDA (then it is a no-op).
    pub fn apply(self) -> bool {
        // SAFETY: writes one field of libtorch's process-wide warning state.
        unsafe { ferroclip_set_sync_debug_mode(self as c_int) == 0 }
    }

    /// The mode in effect; `None` when this libtorch has no CUDA.
    pub fn current() -> Option<SyncDebug> {
        // SAFETY: reads one field of libtorch's process-wide warning state.
        match unsafe { ferroclip_sync_debug_mode() } {
            0 => Some(SyncDebug::Off),
            1 => Some(SyncDebug::Warn),
            2 => Some(SyncDebug::Error),
            _ => None,
        }
    }
}

/// `bytes` bytes of page-locked host memory (torch's caching host allocator), a uint8 CPU tensor.
pub fn pinned_empty(bytes: usize) -> Result<Tensor> {
    // SAFETY: the shim returns a new heap `at::Tensor*` (ownership passes to the Tensor) or null.
    let t = unsafe { ferroclip_pinned_empty(bytes as i64) };
    if t.is_null() {
        bail!("allocating {bytes} bytes of pinned host memory: {}", last_error());
    }
    Ok(unsafe { Tensor::from_ptr(t) })
}

/// A side stream of one GPU for host-to-device copies.
pub struct CopyStream(NonNull<RawCopyStream>);

// SAFETY: a CUDA stream handle may be used from any thread.
unsafe impl Send for CopyStream {}

impl CopyStream {
    pub fn new(device: Device) -> Result<CopyStream> {
        let Device::Cuda(index) = device else { bail!("a copy stream needs a CUDA device, not {device:?}") };
        // SAFETY: returns a new handle or null.
        let s = unsafe { ferroclip_copy_stream_new(index as c_int) };
        NonNull::new(s)
            .map(CopyStream)
            .ok_or_else(|| anyhow::anyhow!("creating a copy stream on {device:?}: {}", last_error()))
    }

    /// Copies each of `srcs` (pinned host) into a new device tensor of its shape and dtype on this
    /// stream, without blocking the host and without waiting for the compute stream's queued work
    /// (the copy overlaps the running step; see `copy_stream.cpp`); the compute stream waits for the
    /// copies. Returns the device tensors and the event that completes when the host memory may be
    /// reused.
    pub fn upload(&self, srcs: &[&Tensor]) -> Result<(Vec<Tensor>, Event)> {
        let raw_srcs: Vec<RawTensor> = srcs.iter().map(|s| raw(s)).collect();
        let mut dsts: Vec<RawTensor> = vec![std::ptr::null_mut(); srcs.len()];
        // SAFETY: the sources outlive the call; the shim fills `dsts` with new heap tensors on success.
        let e =
            unsafe { ferroclip_copy_stream_upload(self.0.as_ptr(), raw_srcs.as_ptr(), dsts.as_mut_ptr(), srcs.len()) };
        let event =
            NonNull::new(e).map(Event).ok_or_else(|| anyhow::anyhow!("host-to-device copy: {}", last_error()))?;
        // SAFETY: each is a new `at::Tensor*` whose ownership passes to the Tensor.
        let tensors = dsts.into_iter().map(|t| unsafe { Tensor::from_ptr(t) }).collect();
        Ok((tensors, event))
    }
}

impl Drop for CopyStream {
    fn drop(&mut self) {
        // SAFETY: created by ferroclip_copy_stream_new, freed once.
        unsafe { ferroclip_copy_stream_free(self.0.as_ptr()) }
    }
}

/// The completion of an upload.
pub struct Event(NonNull<RawEvent>);

// SAFETY: a CUDA event may be queried from any thread.
unsafe impl Send for Event {}

impl Event {
    /// Whether the work before the event has completed; never blocks.
    pub fn is_done(&self) -> Result<bool> {
        // SAFETY: a live event.
        match unsafe { ferroclip_event_query(self.0.as_ptr()) } {
            1 => Ok(true),
            0 => Ok(false),
            _ => bail!("querying a CUDA event: {}", last_error()),
        }
    }

    /// Blocks the host until the event has completed.
    pub fn wait(&self) -> Result<()> {
        // SAFETY: a live event.
        if unsafe { ferroclip_event_synchronize(self.0.as_ptr()) } != 0 {
            bail!("waiting for a CUDA event: {}", last_error());
        }
        Ok(())
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created by the shim, freed once.
        unsafe { ferroclip_event_free(self.0.as_ptr()) }
    }
}

/// The caching allocator's counters for one GPU, in bytes (`torch.cuda.memory_stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    pub allocated: i64,
    /// `torch.cuda.max_memory_allocated`: the peak since start or [`reset_peak_memory`].
    pub peak_allocated: i64,
    /// `torch.cuda.max_memory_reserved`: the peak held by the cache.
    pub peak_reserved: i64,
    /// `num_alloc_retries`: allocations that failed, flushed the cache and tried again — each one a
    /// full synchronization; a step that needs them is at the edge of the GPU's memory.
    pub num_alloc_retries: i64,
}

/// The allocator statistics of `device`; `None` on the CPU (or without CUDA).
pub fn memory_stats(device: Device) -> Option<MemoryStats> {
    let Device::Cuda(index) = device else { return None };
    let mut s = MemoryStats { allocated: 0, peak_allocated: 0, peak_reserved: 0, num_alloc_retries: 0 };
    // SAFETY: writes four i64s.
    let rc = unsafe {
        ferroclip_cuda_memory_stats(
            index as c_int,
            &mut s.allocated,
            &mut s.peak_allocated,
            &mut s.peak_reserved,
            &mut s.num_alloc_retries,
        )
    };
    (rc == 0).then_some(s)
}

/// Starts a new peak for [`memory_stats`] (`torch.cuda.reset_peak_memory_stats`).
pub fn reset_peak_memory(device: Device) -> Result<()> {
    let Device::Cuda(index) = device else { return Ok(()) };
    // SAFETY: a plain call on the allocator.
    if unsafe { ferroclip_cuda_reset_peak_memory(index as c_int) } != 0 {
        bail!("resetting the peak memory of {device:?}: {}", last_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_debug_mode_parses_and_reaches_libtorch() {
        assert_eq!(SyncDebug::parse("warn").unwrap(), SyncDebug::Warn);
        assert_eq!(SyncDebug::parse("").unwrap(), SyncDebug::Off);
        let e = SyncDebug::parse("loud").unwrap_err().to_string();
        assert!(e.contains("FERROCLIP_SYNC_DEBUG") && e.contains("loud"), "{e}");
        // With a CUDA build of libtorch the mode is set in libtorch's own state (no GPU needed).
        if SyncDebug::current().is_some() {
            assert!(SyncDebug::Warn.apply());
            assert_eq!(SyncDebug::current(), Some(SyncDebug::Warn));
            assert!(SyncDebug::Off.apply());
            assert_eq!(SyncDebug::current(), Some(SyncDebug::Off));
        } else {
            assert!(!SyncDebug::Error.apply());
        }
    }

    #[test]
    fn tf32_and_benchmark_flags_are_set_in_atens_context() {
        enable_tf32_and_cudnn_benchmark();
        assert_eq!(backend_flags(), (true, true, true));
    }

    #[test]
    fn without_a_gpu_the_cuda_calls_fail_cleanly() {
        if tch::Cuda::is_available() {
            return;
        }
        assert!(memory_stats(Device::Cpu).is_none());
        assert!(memory_stats(Device::Cuda(0)).is_none());
        let e = CopyStream::new(Device::Cpu).err().expect("no copy stream on the CPU").to_string();
        assert!(e.contains("CUDA"), "{e}");
    }
}
