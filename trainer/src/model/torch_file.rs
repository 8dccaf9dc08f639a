//! State dicts out of `torch.save` files: OpenCLIP's `open_clip_pytorch_model.bin` and Hugging
//! Face's `pytorch_model.bin` (a bare state dict), and open_clip_train's `epoch_N.pt` /
//! `epoch_latest.pt` (a dict whose `state_dict` holds the model's, keys prefixed `module.` when
//! saved under DDP, beside `optimizer`, `epoch`, `name`). The file is read by libtorch's own
//! reader of the format (`trainer/csrc/torch_save.cpp`); what it yields is checked here to be a
//! state dict, each problem named with the file and the key.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};

use tch::Tensor;

/// What is wrong with a file read as `torch.save`'s format: the file, and the key where there is one.
#[derive(Debug, thiserror::Error)]
pub enum TorchFileError {
    /// Not readable as a whole: legacy format, truncated, corrupt, a class that is not a tensor's.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    /// Readable, but an entry is not what a state dict holds.
    #[error("{path}: tensor `{key}` {message}")]
    Key { path: PathBuf, key: String, message: String },
}

extern "C" {
    fn ferroclip_last_error() -> *const c_char;
    fn ferroclip_torch_load(data: *const c_char, len: usize, visit: Visit, ctx: *mut c_void) -> c_int;
}

type Visit = extern "C" fn(*mut c_void, *const c_char, c_int, *mut torch_sys::C_tensor, i64, f64, *const c_char);

/// One leaf of the loaded object.
#[derive(Debug)]
pub enum Leaf {
    Tensor(Tensor),
    Int(i64),
    Double(f64),
    Bool(bool),
    None,
    Str(String),
    /// An empty dict, list or tuple.
    Empty,
}

impl Leaf {
    fn kind(&self) -> &'static str {
        match self {
            Leaf::Tensor(_) => "tensor",
            Leaf::Int(_) => "integer",
            Leaf::Double(_) => "float",
            Leaf::Bool(_) => "bool",
            Leaf::None => "None",
            Leaf::Str(_) => "string",
            Leaf::Empty => "empty container",
        }
    }
}

/// How a weights file is encoded, told by its first bytes (not its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A zip archive: `torch.save` since PyTorch 1.6.
    TorchZip,
    /// A bare pickle: `torch.save(..., _use_new_zipfile_serialization=False)` or PyTorch < 1.6.
    TorchLegacy,
    /// Anything else is read as safetensors.
    Safetensors,
}

impl Format {
    pub fn of(head: &[u8]) -> Format {
        if head.starts_with(b"PK\x03\x04") {
            Format::TorchZip
        } else if head.get(8) == Some(&b'{') {
            // safetensors: an 8-byte little-endian header length, then the JSON header. Checked
            // before the pickle test: a header length's low byte may well be 0x80.
            Format::Safetensors
        } else if head.first() == Some(&0x80) {
            // Pickle protocol 2+ starts with PROTO (0x80); torch's legacy format pickles its magic number first.
            Format::TorchLegacy
        } else {
            Format::Safetensors
        }
    }

    /// The format of the file at `path` (its first bytes).
    pub fn of_file(path: &Path) -> std::io::Result<Format> {
        use std::io::Read;
        let mut head = [0u8; 9];
        let mut f = std::fs::File::open(path)?;
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..])? {
                0 => break,
                k => n += k,
            }
        }
        Ok(Format::of(&head[..n]))
    }
}

/// Every leaf of the object `torch.save` wrote to `path`, with its path of keys from the root.
pub fn read(path: &Path) -> Result<Vec<(Vec<String>, Leaf)>, TorchFileError> {
    let bad = |message: String| TorchFileError::File { path: path.to_path_buf(), message };
    let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    match Format::of(&bytes) {
        Format::TorchZip => {}
        Format::TorchLegacy => {
            return Err(bad("a legacy (non-zip) torch.save file, which libtorch cannot read: re-save it in \
                            Python with `torch.save(torch.load(f, map_location=\"cpu\"), new_f)`"
                .into()))
        }
        Format::Safetensors => return Err(bad("not a torch.save file (no zip archive)".into())),
    }
    check_members(&bytes).map_err(|e| bad(format!("a corrupt torch.save file: {e}")))?;
    let mut leaves: Vec<(Vec<String>, Leaf)> = Vec::new();
    // SAFETY: `bytes` outlives the call; `visit` receives `&mut leaves` as ctx and is only called
    // during it, on this thread.
    let rc = unsafe {
        ferroclip_torch_load(bytes.as_ptr() as *const c_char, bytes.len(), visit, &mut leaves as *mut _ as *mut c_void)
    };
    if rc != 0 {
        // SAFETY: the shim returns a NUL-terminated thread-local string, valid until the next failing call.
        let msg = unsafe { CStr::from_ptr(ferroclip_last_error()) }.to_string_lossy().into_owned();
        return Err(bad(format!("not a readable torch.save file: {msg}")));
    }
    Ok(leaves)
}

/// Every member of the zip read against the CRC-32 its directory records: libtorch's reader does
/// not compare them, so a flipped bit in a tensor's bytes would load silently.
fn check_members(bytes: &[u8]) -> Result<(), String> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| e.to_string())?;
    for i in 0..zip.len() {
        let mut member = zip.by_index(i).map_err(|e| e.to_string())?;
        let name = member.name().to_string();
        std::io::copy(&mut member, &mut std::io::sink()).map_err(|e| format!("member `{name}`: {e}"))?;
    }
    Ok(())
}

extern "C" fn visit(
    ctx: *mut c_void,
    path: *const c_char,
    kind: c_int,
    tensor: *mut torch_sys::C_tensor,
    i: i64,
    d: f64,
    s: *const c_char,
) {
    // SAFETY: ctx is the `&mut Vec` `read` passed, alive and exclusively ours for the call.
    let leaves = unsafe { &mut *(ctx as *mut Vec<(Vec<String>, Leaf)>) };
    // SAFETY: the shim passes NUL-terminated strings valid for this call.
    let path = unsafe { CStr::from_ptr(path) }.to_string_lossy();
    let keys: Vec<String> = if path.is_empty() { Vec::new() } else { path.split('\x1f').map(str::to_string).collect() };
    let leaf = match kind {
        // SAFETY: a tensor the shim allocated for us (`new at::Tensor`); tch takes ownership.
        0 => Leaf::Tensor(unsafe { Tensor::from_ptr(tensor) }),
        1 => Leaf::Int(i),
        2 => Leaf::Double(d),
        3 => Leaf::Bool(i != 0),
        4 => Leaf::None,
        // SAFETY: as above.
        5 => Leaf::Str(unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()),
        _ => Leaf::Empty,
    };
    leaves.push((keys, leaf));
}

/// The model state dict in the torch.save file `path`: the file's top-level dict itself when it
/// holds only tensors (`torch.save(model.state_dict())`), or its `state_dict` entry (an
/// open_clip_train checkpoint). Keys as saved (a `module.` prefix is the loader's business).
pub fn state_dict(path: &Path) -> Result<Vec<(String, Tensor)>, TorchFileError> {
    let leaves = read(path)?;
    let not_state_dict =
        |key: &[String], message: String| TorchFileError::Key { path: path.to_path_buf(), key: key.join("/"), message };
    let nested = leaves.iter().any(|(keys, _)| keys.first().map(String::as_str) == Some("state_dict"));
    let mut out = Vec::new();
    for (keys, leaf) in leaves {
        let key: &[String] = if nested {
            match keys.split_first() {
                Some((first, rest)) if first == "state_dict" => rest,
                // optimizer state, epoch, name: not the model's.
                _ => continue,
            }
        } else {
            &keys
        };
        match (key, leaf) {
            ([name], Leaf::Tensor(t)) => out.push((name.clone(), t)),
            ([], leaf) => {
                return Err(not_state_dict(
                    &keys,
                    format!("is a {}, not a dict of tensors (a state dict)", leaf.kind()),
                ))
            }
            ([_], leaf) => return Err(not_state_dict(key, format!("is a {}, not a tensor", leaf.kind()))),
            (_, _) => return Err(not_state_dict(key, "is nested: a state dict maps names to tensors".into())),
        }
    }
    Ok(out)
}
