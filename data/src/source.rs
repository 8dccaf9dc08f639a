//! Shard sources: brace patterns, `::`-joined weighted sources, local files and `pipe:CMD`.
//!
//! Follows OpenCLIP's `expand_urls` (`open_clip_train/data.py`: `::` separates sources, each
//! with an optional upsampling weight) and webdataset's `gopen` (`pipe:` runs a shell command
//! whose stdout is the tar stream) and `braceexpand` (`{000..099}` keeps zero padding, `{a,b}`).
//!
//! Every byte read is recorded as [`Activity`], which is how the loader tells a slow reader
//! from a stalled one (`data.read_timeout_s`); a `pipe:` command runs in its own process group,
//! so an abandoned or finished shard ends the whole command, not just its shell, and a guard in
//! that group ends it when this process ends without running destructors (exit, signals).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::DataError;
use crate::tar::ShardStream;

/// Signs of life of one reader: when it last read a byte (or otherwise moved), and the process
/// group of the `pipe:` command it is reading, so that a stalled command can be ended.
#[derive(Debug)]
pub struct Activity {
    origin: Instant,
    /// Milliseconds after `origin` of the last progress.
    last_ms: AtomicU64,
    /// Set when the loader gave up on this reader: it must stop without reporting anything.
    abandoned: AtomicBool,
    pipe_group: Mutex<Option<i32>>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            abandoned: AtomicBool::new(false),
            pipe_group: Mutex::new(None),
        }
    }
}

impl Activity {
    /// Record progress now.
    pub fn touch(&self) {
        self.last_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since the last progress.
    pub fn idle(&self) -> Duration {
        self.origin.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }

    /// Give up on this reader: end its `pipe:` command (which unblocks its read) and tell it to stop.
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Relaxed);
        if let Some(group) = *self.pipe_group.lock().unwrap_or_else(|p| p.into_inner()) {
            kill_group(group);
        }
    }

    pub fn is_abandoned(&self) -> bool {
        self.abandoned.load(Ordering::Relaxed)
    }
}

fn kill_group(group: i32) {
    // SAFETY: plain syscall; a group that already exited makes it fail with ESRCH, harmlessly.
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
}

/// One shard to read: a local path or a `pipe:` command, with the weight of its source.
#[derive(Debug, Clone, PartialEq)]
pub struct Shard {
    /// The shard as written in the pattern after brace expansion (`pipe:` kept).
    pub url: String,
    /// Sampling weight in resampled mode (the weight of its `::` source).
    pub weight: f64,
}

/// Expand `{a..b}` ranges and `{x,y}` lists, left to right, like Python's `braceexpand`.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, DataError> {
    let bad = |m: &str| DataError::BadPattern { pattern: pattern.to_string(), message: m.to_string() };
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err(bad("unmatched `}`"));
        }
        return Ok(vec![pattern.to_string()]);
    };
    let close = pattern[open..].find('}').map(|i| i + open).ok_or_else(|| bad("unmatched `{`"))?;
    let body = &pattern[open + 1..close];
    if body.contains('{') {
        return Err(bad("nested braces are not supported"));
    }
    let (head, tail) = (&pattern[..open], &pattern[close + 1..]);
    let alternatives: Vec<String> = if let Some((a, b)) = body.split_once("..") {
        let (lo, hi) = (
            a.parse::<u64>().map_err(|_| bad("range bound is not a number"))?,
            b.parse::<u64>().map_err(|_| bad("range bound is not a number"))?,
        );
        // braceexpand pads to the longer bound when either bound is written zero-padded.
        let padded = (a.len() > 1 && a.starts_with('0')) || (b.len() > 1 && b.starts_with('0'));
        let width = if padded { a.len().max(b.len()) } else { 0 };
        let range: Vec<u64> = if lo <= hi { (lo..=hi).collect() } else { (hi..=lo).rev().collect() };
        range.into_iter().map(|n| format!("{n:0width$}")).collect()
    } else if body.contains(',') {
        body.split(',').map(str::to_string).collect()
    } else {
        // `{x}` is literal in bash/braceexpand.
        return Ok(expand_braces(tail)?.into_iter().map(|t| format!("{head}{{{body}}}{t}")).collect());
    };
    let tails = expand_braces(tail)?;
    let mut out = Vec::with_capacity(alternatives.len() * tails.len());
    for alt in &alternatives {
        for t in &tails {
            out.push(format!("{head}{alt}{t}"));
        }
    }
    Ok(out)
}

/// Expand a `::`-joined shard pattern into shards, each carrying its source's weight
/// (`weights` empty: 1.0 each, i.e. sources weighted by their shard counts, as OpenCLIP).
///
/// Fails with [`DataError::NoShards`] when a local source matches no existing file.
pub fn expand_shards(pattern: &str, weights: &[f64]) -> Result<Vec<Shard>, DataError> {
    let sources: Vec<&str> = pattern.split("::").map(str::trim).filter(|s| !s.is_empty()).collect();
    if sources.is_empty() {
        return Err(DataError::NoShards { pattern: pattern.to_string() });
    }
    if !weights.is_empty() && weights.len() != sources.len() {
        return Err(DataError::BadPattern {
            pattern: pattern.to_string(),
            message: format!("{} weights for {} `::`-separated sources", weights.len(), sources.len()),
        });
    }
    let mut shards = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let weight = weights.get(i).copied().unwrap_or(1.0);
        let urls = expand_braces(source)?;
        // A local source must match at least one file at start-up: a typo in a path is an
        // error now, not an endless stream of missing-shard warnings later. Individual missing
        // files in a range are skipped (and counted) when read.
        if !source.starts_with("pipe:") && !urls.iter().any(|u| Path::new(u).exists()) {
            return Err(DataError::NoShards { pattern: source.to_string() });
        }
        shards.extend(urls.into_iter().map(|url| Shard { url, weight }));
    }
    Ok(shards)
}

/// Which decompressor a shard needs, by its name's extension (for `pipe:` the command's text).
fn compression(url: &str) -> Compression {
    let u = url.trim_end().to_ascii_lowercase();
    if u.ends_with(".tar.gz") || u.ends_with(".tgz") {
        Compression::Gzip
    } else if u.ends_with(".tar.zst") || u.ends_with(".tzst") {
        Compression::Zstd
    } else {
        Compression::None
    }
}

enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Counts the (compressed) bytes read from a shard into a shared counter, and each read as
/// progress.
struct Counting<R> {
    inner: R,
    bytes: Arc<AtomicU64>,
    activity: Arc<Activity>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        if n > 0 {
            self.activity.touch();
        }
        Ok(n)
    }
}

/// stdout of a `pipe:` command; at its end, a non-zero exit status becomes a read error so a
/// failing download (`pipe:curl ...` on a 404, `pipe:false`) counts as a failed shard.
struct PipeReader {
    child: Child,
    /// The command's guard (see [`guard_group`]), `None` if the command ended before it started.
    guard: Option<Child>,
    cmd: String,
    done: bool,
    activity: Arc<Activity>,
}

/// A shell in the command's process group that waits for end of file on its stdin, whose other
/// end only this process holds, then kills the group: when this process ends in any way that runs
/// no destructor (`exit`, a signal, SIGKILL, an abort), the kernel closes that pipe and a hung
/// download dies with the rank instead of outliving it. Being in the group, it also keeps the
/// group's id from being reused while it waits, and it dies whenever the group is killed.
fn guard_group(group: i32) -> Option<Child> {
    Command::new("sh")
        .arg("-c")
        .arg("read _; kill -KILL 0")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(group)
        .spawn()
        .ok()
}

impl PipeReader {
    /// The command is over (or abandoned): end what is left of its group, guard included.
    fn end_group(&mut self) {
        kill_group(self.child.id() as i32);
        if let Some(mut guard) = self.guard.take() {
            let _ = guard.wait();
        }
    }
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.child.stdout.as_mut().expect("stdout piped").read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.done = true;
            let status = self.child.wait()?;
            self.end_group();
            if self.activity.is_abandoned() {
                let why = format!("`{}` was ended: no progress within data.read_timeout_s", self.cmd);
                return Err(io::Error::other(why));
            }
            if !status.success() {
                return Err(io::Error::other(format!("`{}` exited with {status}", self.cmd)));
            }
        }
        Ok(n)
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        // Stopping early (end of epoch, loader dropped) must not leave downloads running: end
        // the command's whole process group (a shell's children included).
        *self.activity.pipe_group.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if !self.done {
            self.end_group();
            let _ = self.child.wait();
        }
    }
}

/// A stream that cannot seek (pipes, decompressors).
struct Sequential<R>(R);

impl<R: Read + Send> Read for Sequential<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read + Send> ShardStream for Sequential<R> {}

/// An uncompressed local shard: payloads can be seeked over.
struct LocalTar {
    file: BufReader<Counting<File>>,
    /// The file's size when opened.
    len: u64,
}

impl Read for LocalTar {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl ShardStream for LocalTar {
    fn seek_forward(&mut self, n: u64) -> io::Result<bool> {
        // A seek may land past the end, where reading then finds a clean end of file: a member
        // whose size runs past the end would pass for a complete shard. Reading it through would
        // fail, so seeking must too.
        let at = self.file.stream_position()?;
        if at.checked_add(n).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated tar member"));
        }
        let n = i64::try_from(n).map_err(io::Error::other)?;
        self.file.seek_relative(n)?;
        Ok(true)
    }
}

impl Seek for Counting<File> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
    }
}

/// Open a shard as a decompressed byte stream; `bytes` counts the raw bytes read, `activity`
/// records progress.
pub fn open_shard(shard: &Shard, bytes: Arc<AtomicU64>, activity: Arc<Activity>) -> io::Result<Box<dyn ShardStream>> {
    activity.touch();
    if let Some(cmd) = shard.url.strip_prefix("pipe:") {
        let child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()?;
        let guard = guard_group(child.id() as i32);
        *activity.pipe_group.lock().unwrap_or_else(|p| p.into_inner()) = Some(child.id() as i32);
        // Abandoned while the command started (before its group was known): end it now.
        if activity.is_abandoned() {
            kill_group(child.id() as i32);
        }
        if let Some(out) = &child.stdout {
            use std::os::fd::AsRawFd;
            // A 1 MiB pipe (Linux's default limit for unprivileged processes) instead of 64 KiB:
            // 16x fewer reads and context switches per shard. Failure only costs that.
            // SAFETY: plain fcntl on a descriptor we own.
            unsafe { libc::fcntl(out.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
        }
        let pipe = PipeReader { child, guard, cmd: cmd.to_string(), done: false, activity: activity.clone() };
        return decompress(&shard.url, BufReader::with_capacity(1 << 20, Counting { inner: pipe, bytes, activity }));
    }
    // A small buffer: large payload reads bypass it anyway, and seeking over payloads
    // (skipped samples, a resume's way to its offsets) then skips real I/O.
    let inner = File::open(&shard.url)?;
    let len = inner.metadata()?.len();
    let file = BufReader::with_capacity(16 << 10, Counting { inner, bytes, activity });
    Ok(match compression(&shard.url) {
        Compression::None => Box::new(LocalTar { file, len }),
        _ => decompress(&shard.url, file)?,
    })
}

fn decompress<R: Read + Send + 'static>(url: &str, raw: BufReader<R>) -> io::Result<Box<dyn ShardStream>> {
    Ok(match compression(url) {
        Compression::None => Box::new(Sequential(raw)),
        Compression::Gzip => Box::new(Sequential(flate2::read::MultiGzDecoder::new(raw))),
        Compression::Zstd => Box::new(Sequential(zstd::stream::read::Decoder::with_buffer(raw)?)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_keep_zero_padding_and_expand_lists_left_to_right() {
        assert_eq!(expand_braces("s/{000..002}.tar").unwrap(), ["s/000.tar", "s/001.tar", "s/002.tar"]);
        assert_eq!(expand_braces("{8..10}").unwrap(), ["8", "9", "10"]);
        assert_eq!(expand_braces("{a,b}-{0..1}").unwrap(), ["a-0", "a-1", "b-0", "b-1"]);
        assert_eq!(expand_braces("x{y}").unwrap(), ["x{y}"]);
        assert!(expand_braces("x{1..2").is_err());
        assert!(expand_braces("x{1..z}").is_err());
    }

    #[test]
    fn sources_carry_weights_and_a_missing_source_is_an_error() {
        let shards = expand_shards("pipe:cat a{0..1}::pipe:cat b", &[2.0, 0.5]).unwrap();
        let got: Vec<(&str, f64)> = shards.iter().map(|s| (s.url.as_str(), s.weight)).collect();
        assert_eq!(got, [("pipe:cat a0", 2.0), ("pipe:cat a1", 2.0), ("pipe:cat b", 0.5)]);
        let err = expand_shards("/nonexistent/{0..3}.tar", &[]).unwrap_err();
        assert!(matches!(err, DataError::NoShards { .. }), "{err}");
        assert!(err.to_string().contains("matches no file"), "{err}");
    }
}
