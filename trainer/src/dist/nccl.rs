//! The NCCL backend: collectives on CUDA tensors, device to device.
//!
//! NCCL is not linked at build time: the dozen functions needed are bound with `libloading` from
//! `libnccl.so.2`, the library PyTorch's wheel depends on (PyPI `nvidia-nccl-cu13` ships only the
//! `.so.2` name), so this compiles and its discovery is testable on machines without CUDA. The
//! bootstrap follows llm.c's `llmc/zero.cuh` (`multi_gpu_config_init`): `cudaSetDevice(local rank)`,
//! rank 0 makes the `ncclUniqueId`, MPI broadcasts it, every rank calls `ncclCommInitRank`.
//!
//! Streams: tch does not expose PyTorch's current CUDA stream, and nothing in this project changes
//! it, so torch's kernels run on the legacy default stream. NCCL calls are enqueued on that same
//! stream (`cudaStream_t` null), which orders them after the kernels that produced their inputs
//! and before those that consume their outputs, with no host synchronisation.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use thiserror::Error;

use super::mpi::MpiCollective;
use super::Collective;

/// Environment variable naming the exact `libnccl.so.2` to load; no other place is tried then.
pub const NCCL_LIB_ENV: &str = "FERROCLIP_NCCL_LIB";
const NCCL_SONAME: &str = "libnccl.so.2";

#[derive(Debug, Error)]
pub enum NcclError {
    #[error("cannot load NCCL ({NCCL_SONAME}); set {NCCL_LIB_ENV} to its path, or install PyTorch's nvidia-nccl package. Tried:\n  {}", tried.join("\n  "))]
    NotFound { tried: Vec<String> },
    #[error("{lib} has no symbol {name}: {source}")]
    Symbol { lib: String, name: &'static str, source: libloading::Error },
    #[error("{call} failed: {message} (ncclResult_t {code})")]
    Call { call: &'static str, code: c_int, message: String },
    #[error("CUDA runtime: {0}")]
    Cuda(String),
    #[error("NCCL has no data type for {0:?} tensors")]
    UnsupportedKind(Kind),
    #[error("NCCL needs CUDA tensors, got one on {0:?}")]
    NotCuda(Device),
}

/// `ncclUniqueId`: 128 opaque bytes, passed by value to `ncclCommInitRank`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

type Comm = *mut c_void;
type Stream = *mut c_void;
type NcclResult = c_int;
const NCCL_SUCCESS: NcclResult = 0;
const NCCL_SUM: c_int = 0;

/// The NCCL entry points this backend uses, bound from one loaded library.
pub struct NcclLib {
    path: String,
    get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(Comm) -> NcclResult,
    comm_abort: unsafe extern "C" fn(Comm) -> NcclResult,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> NcclResult,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, Comm, Stream) -> NcclResult,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, Stream) -> NcclResult,
    group_start: unsafe extern "C" fn() -> NcclResult,
    group_end: unsafe extern "C" fn() -> NcclResult,
    // Keeps the function pointers above valid; last so it is dropped last.
    _lib: libloading::Library,
}

/// Where to look for NCCL, in order. `override_path` (from [`NCCL_LIB_ENV`]) is the only
/// candidate when set; otherwise the `nvidia/nccl/lib` next to each torch lib dir (the pip
/// layout: `site-packages/torch/lib` and `site-packages/nvidia/nccl/lib`), each `LD_LIBRARY_PATH`
/// entry, and last the bare soname for the dynamic loader (which also finds a copy already
/// loaded by `libtorch_cuda.so`).
pub fn candidates(override_path: Option<&str>, torch_lib_dirs: &[PathBuf], ld_library_path: Option<&str>) -> Vec<PathBuf> {
    if let Some(p) = override_path.filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut out = Vec::new();
    for dir in torch_lib_dirs {
        out.push(dir.join("../../nvidia/nccl/lib").join(NCCL_SONAME));
    }
    for dir in ld_library_path.unwrap_or("").split(':').filter(|d| !d.is_empty()) {
        out.push(Path::new(dir).join(NCCL_SONAME));
    }
    out.push(PathBuf::from(NCCL_SONAME));
    out.dedup();
    out
}

/// Directories of the libtorch libraries mapped into this process (from `/proc/self/maps`).
fn loaded_torch_lib_dirs() -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else { continue };
        let p = Path::new(path);
        let is_torch = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libtorch_cpu"));
        if let (true, Some(dir)) = (is_torch, p.parent()) {
            if !dirs.iter().any(|d| d == dir) {
                dirs.push(dir.to_path_buf());
            }
        }
    }
    dirs
}

impl NcclLib {
    /// Finds and binds NCCL as described in [`candidates`], from this process's environment.
    pub fn load() -> Result<Self, NcclError> {
        let over = std::env::var(NCCL_LIB_ENV).ok();
        let ld = std::env::var("LD_LIBRARY_PATH").ok();
        Self::load_from(&candidates(over.as_deref(), &loaded_torch_lib_dirs(), ld.as_deref()))
    }

    /// Binds the first candidate that loads.
    pub fn load_from(candidates: &[PathBuf]) -> Result<Self, NcclError> {
        let mut tried = Vec::new();
        for c in candidates {
            // A path with a directory that does not exist is not worth a dlopen error message.
            if c.components().count() > 1 && !c.exists() {
                tried.push(format!("{}: no such file", c.display()));
                continue;
            }
            // SAFETY: loading NCCL runs its (trusted) initializers only.
            match unsafe { libloading::Library::new(c) } {
                Ok(lib) => return Self::bind(lib, c.display().to_string()),
                Err(e) => tried.push(format!("{}: {e}", c.display())),
            }
        }
        Err(NcclError::NotFound { tried })
    }

    fn bind(lib: libloading::Library, path: String) -> Result<Self, NcclError> {
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the Rust signature in the field type matches nccl.h for this symbol.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|source| NcclError::Symbol { lib: path.clone(), name: $name, source })?
            };
        }
        Ok(NcclLib {
            get_version: sym!("ncclGetVersion"),
            get_error_string: sym!("ncclGetErrorString"),
            get_unique_id: sym!("ncclGetUniqueId"),
            comm_init_rank: sym!("ncclCommInitRank"),
            comm_destroy: sym!("ncclCommDestroy"),
            comm_abort: sym!("ncclCommAbort"),
            all_reduce: sym!("ncclAllReduce"),
            all_gather: sym!("ncclAllGather"),
            broadcast: sym!("ncclBroadcast"),
            group_start: sym!("ncclGroupStart"),
            group_end: sym!("ncclGroupEnd"),
            path,
            _lib: lib,
        })
    }

    /// The file (or soname) the library was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// NCCL's version code, e.g. 22703 for 2.27.3.
    pub fn version(&self) -> Result<i32, NcclError> {
        let mut v = 0;
        self.check("ncclGetVersion", unsafe { (self.get_version)(&mut v) })?;
        Ok(v)
    }

    /// NCCL's text for a result code.
    pub fn error_string(&self, code: c_int) -> String {
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let p = unsafe { (self.get_error_string)(code) };
        if p.is_null() {
            return format!("unknown NCCL error {code}");
        }
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn check(&self, call: &'static str, code: NcclResult) -> Result<(), NcclError> {
        if code == NCCL_SUCCESS {
            Ok(())
        } else {
            Err(NcclError::Call { call, code, message: self.error_string(code) })
        }
    }
}

/// NCCL's `ncclDataType_t` for a tensor kind.
fn data_type(kind: Kind) -> Result<c_int, NcclError> {
    Ok(match kind {
        Kind::Int8 => 0,
        Kind::Uint8 | Kind::Bool => 1,
        Kind::Int => 2,
        Kind::Int64 => 4,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::BFloat16 => 9,
        k => return Err(NcclError::UnsupportedKind(k)),
    })
}

/// `cudaSetDevice`, taken from the CUDA runtime that libtorch_cuda already loaded (or loaded here).
fn cuda_set_device(index: usize) -> Result<(), NcclError> {
    type SetDevice = unsafe extern "C" fn(c_int) -> c_int;
    // SAFETY: dlopen(NULL) is this process; the symbol, if present, has cudaSetDevice's signature.
    let this = libloading::os::unix::Library::this();
    let f: Option<SetDevice> = unsafe { this.get::<SetDevice>(b"cudaSetDevice\0") }.ok().map(|s| *s);
    let f = match f {
        Some(f) => f,
        None => {
            let mut errs = Vec::new();
            let mut found = None;
            for name in ["libcudart.so.13", "libcudart.so.12", "libcudart.so"] {
                match unsafe { libloading::Library::new(name) } {
                    Ok(lib) => {
                        let f: SetDevice = *unsafe { lib.get::<SetDevice>(b"cudaSetDevice\0") }
                            .map_err(|e| NcclError::Cuda(format!("{name}: {e}")))?;
                        // The runtime must stay loaded for the life of the process.
                        std::mem::forget(lib);
                        found = Some(f);
                        break;
                    }
                    Err(e) => errs.push(format!("{name}: {e}")),
                }
            }
            found.ok_or_else(|| NcclError::Cuda(format!("no CUDA runtime: {}", errs.join("; "))))?
        }
    };
    match unsafe { f(index as c_int) } {
        0 => Ok(()),
        code => Err(NcclError::Cuda(format!("cudaSetDevice({index}) returned error {code}"))),
    }
}

/// Collectives over an NCCL communicator spanning every rank, one GPU per rank. Host-side
/// operations (barrier, abort, the id exchange) go through MPI.
pub struct NcclCollective {
    lib: NcclLib,
    comm: Comm,
    mpi: Option<MpiCollective>,
    rank: usize,
    world_size: usize,
    device: Device,
}

impl NcclCollective {
    /// Makes the communicator on CUDA device `device_index` (normally the local rank). `mpi` is
    /// `None` only for a one-process run (world size 1, no launcher). Collective: every rank calls it.
    pub fn new(mpi: Option<MpiCollective>, device_index: usize) -> Result<Self, NcclError> {
        let lib = NcclLib::load()?;
        let (rank, world_size) = mpi.as_ref().map_or((0, 1), |m| (m.rank(), m.world_size()));
        cuda_set_device(device_index)?;
        let mut id = UniqueId { internal: [0; 128] };
        if rank == 0 {
            lib.check("ncclGetUniqueId", unsafe { (lib.get_unique_id)(&mut id) })?;
        }
        if let Some(m) = &mpi {
            // SAFETY: UniqueId is 128 plain bytes.
            let bytes = unsafe { std::slice::from_raw_parts_mut(id.internal.as_mut_ptr() as *mut u8, 128) };
            m.broadcast_bytes(bytes, 0);
        }
        let mut comm: Comm = std::ptr::null_mut();
        lib.check("ncclCommInitRank", unsafe {
            (lib.comm_init_rank)(&mut comm, world_size as c_int, id, rank as c_int)
        })?;
        Ok(NcclCollective { lib, comm, mpi, rank, world_size, device: Device::Cuda(device_index) })
    }

    /// The GPU this rank's communicator runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The loaded NCCL library.
    pub fn lib(&self) -> &NcclLib {
        &self.lib
    }

    /// Fail fast: an NCCL error means this rank cannot continue and the others would wait for it.
    fn or_abort<T>(&self, r: Result<T, NcclError>) -> T {
        r.unwrap_or_else(|e| {
            eprintln!("error on rank {} of {}: {e}", self.rank, self.world_size);
            self.abort(1)
        })
    }

    fn checked_type(&self, t: &Tensor) -> Result<c_int, NcclError> {
        match t.device() {
            Device::Cuda(_) => {}
            d => return Err(NcclError::NotCuda(d)),
        }
        data_type(t.kind())
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            unsafe { (self.lib.comm_destroy)(self.comm) };
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, t: &mut Tensor) {
        let dt = self.or_abort(self.checked_type(t));
        let work = t.contiguous();
        let p = work.data_ptr();
        let r = unsafe { (self.lib.all_reduce)(p, p, work.numel(), dt, NCCL_SUM, self.comm, std::ptr::null_mut()) };
        self.or_abort(self.lib.check("ncclAllReduce", r));
        if work.data_ptr() != t.data_ptr() {
            t.copy_(&work);
        }
    }

    fn all_gather(&self, t: &Tensor) -> Tensor {
        let dt = self.or_abort(self.checked_type(t));
        let work = t.contiguous();
        let mut shape = work.size();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] *= self.world_size as i64;
        let out = Tensor::empty(shape.as_slice(), (work.kind(), work.device()));
        let r = unsafe {
            (self.lib.all_gather)(work.data_ptr(), out.data_ptr(), work.numel(), dt, self.comm, std::ptr::null_mut())
        };
        self.or_abort(self.lib.check("ncclAllGather", r));
        out
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) {
        let dt = self.or_abort(self.checked_type(t));
        let work = t.contiguous();
        let p = work.data_ptr();
        let r = unsafe {
            (self.lib.broadcast)(p, p, work.numel(), dt, root as c_int, self.comm, std::ptr::null_mut())
        };
        self.or_abort(self.lib.check("ncclBroadcast", r));
        if work.data_ptr() != t.data_ptr() {
            t.copy_(&work);
        }
    }

    fn barrier(&self) {
        if let Some(m) = &self.mpi {
            m.barrier();
        }
    }

    fn abort(&self, code: i32) -> ! {
        // Tear down the communicator first so this rank's GPU work stops, then take the job down.
        if !self.comm.is_null() {
            unsafe { (self.lib.comm_abort)(self.comm) };
        }
        match &self.mpi {
            Some(m) => m.abort(code),
            None => std::process::exit(code),
        }
    }
}

/// Runs `f` inside `ncclGroupStart`/`ncclGroupEnd`, so several NCCL calls (e.g. one per gradient
/// bucket) are launched as one.
pub fn grouped<T>(c: &NcclCollective, f: impl FnOnce(&NcclCollective) -> T) -> T {
    c.or_abort(c.lib.check("ncclGroupStart", unsafe { (c.lib.group_start)() }));
    let out = f(c);
    c.or_abort(c.lib.check("ncclGroupEnd", unsafe { (c.lib.group_end)() }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_is_the_only_candidate() {
        let c = candidates(Some("/opt/x/libnccl.so.2"), &[PathBuf::from("/t/lib")], Some("/a:/b"));
        assert_eq!(c, vec![PathBuf::from("/opt/x/libnccl.so.2")]);
    }

    #[test]
    fn search_order_is_torch_then_ld_library_path_then_loader() {
        let c = candidates(Some(""), &[PathBuf::from("/sp/torch/lib")], Some("/a::/b"));
        assert_eq!(
            c,
            vec![
                PathBuf::from("/sp/torch/lib/../../nvidia/nccl/lib/libnccl.so.2"),
                PathBuf::from("/a/libnccl.so.2"),
                PathBuf::from("/b/libnccl.so.2"),
                PathBuf::from("libnccl.so.2"),
            ]
        );
    }

    #[test]
    fn missing_library_is_an_error_listing_what_was_tried() {
        let dir = std::env::temp_dir().join(format!("ferroclip-no-nccl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Not a shared object: dlopen fails and the error must say where and why.
        let fake = dir.join("libnccl.so.2");
        std::fs::write(&fake, b"not an ELF file").unwrap();
        let missing = dir.join("absent/libnccl.so.2");
        let err = NcclLib::load_from(&[missing.clone(), fake.clone()]).err().expect("must fail");
        let msg = err.to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(err, NcclError::NotFound { ref tried } if tried.len() == 2), "{msg}");
        assert!(msg.contains(NCCL_LIB_ENV), "{msg}");
        assert!(msg.contains(&missing.display().to_string()) && msg.contains("no such file"), "{msg}");
        assert!(msg.contains(&fake.display().to_string()), "{msg}");
    }

    #[test]
    fn a_library_without_nccl_symbols_is_rejected() {
        // libc loads fine but is not NCCL.
        let err = NcclLib::load_from(&[PathBuf::from("libc.so.6")]).err().expect("must fail");
        assert!(matches!(err, NcclError::Symbol { name: "ncclGetVersion", .. }), "{err}");
    }

    #[test]
    fn torch_lib_dir_is_found_in_this_process() {
        // The test binary links libtorch, so its directory is discoverable at run time.
        let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
        let dirs = loaded_torch_lib_dirs();
        assert!(dirs.iter().any(|d| d.join("libtorch_cpu.so").exists()), "{dirs:?}");
    }

    /// PyTorch's CUDA wheel (the libtorch this project builds against) depends on the
    /// `nvidia-nccl` package, GPU or not: binding it must work and its error strings come through.
    #[test]
    fn binds_the_wheel_nccl() {
        let torch_dirs = loaded_torch_lib_dirs();
        let wheel: Vec<PathBuf> = candidates(None, &torch_dirs, None).into_iter().filter(|p| p.exists()).collect();
        assert!(!wheel.is_empty(), "no nvidia/nccl/lib/libnccl.so.2 next to {torch_dirs:?}");
        let lib = NcclLib::load_from(&wheel).unwrap();
        let v = lib.version().unwrap();
        assert!(v >= 2_0000, "NCCL version code {v}");
        assert!(lib.error_string(1).to_lowercase().contains("cuda"), "{}", lib.error_string(1));
        assert_eq!(data_type(Kind::BFloat16).unwrap(), 9);
        assert!(matches!(data_type(Kind::ComplexFloat), Err(NcclError::UnsupportedKind(_))));
    }
}
