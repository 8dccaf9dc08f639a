//! A streaming tar member reader over any `Read` (POSIX ustar, pax and GNU long names).
//!
//! webdataset reads shards with Python's `tarfile` in stream mode (`tariterators.py`); we do the
//! same one member at a time, so memory is bounded by the largest member, never the shard.
//! Every malformed input (bad checksum, truncated header or payload, absurd size) is an
//! `io::Error`, never a panic: the loader then skips the rest of the shard.
//!
//! Each member reports the tar offset of its first header block, so a reader can later start
//! again at that member ([`TarReader::starting_at`]): a local shard seeks there, a stream reads
//! up to it.

use std::io::{self, Read};

/// A member's content.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Bytes(Vec<u8>),
    /// Not kept: the caller asked to pass over it (seeked over where the stream can seek).
    Skipped,
    /// Not read: larger than the reader's member limit (`data.max_member_bytes`).
    TooLarge,
}

impl Payload {
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Payload::Bytes(b) => Some(b),
            _ => None,
        }
    }
}

/// One regular-file member.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Path inside the archive.
    pub name: String,
    pub payload: Payload,
    pub size: u64,
    /// Tar offset of the member's first header block (its pax or long-name header, if any).
    pub offset: u64,
}

/// A shard byte stream; local plain files can also seek forward over member payloads.
pub trait ShardStream: Read + Send {
    /// Skip `n` bytes without reading them; `Ok(false)` when this stream cannot seek.
    fn seek_forward(&mut self, _n: u64) -> io::Result<bool> {
        Ok(false)
    }
}

impl ShardStream for &[u8] {}

impl<T: ShardStream + ?Sized> ShardStream for Box<T> {
    fn seek_forward(&mut self, n: u64) -> io::Result<bool> {
        (**self).seek_forward(n)
    }
}

/// Iterates the regular-file members of a tar stream.
pub struct TarReader<R> {
    inner: R,
    finished: bool,
    /// Bytes of the tar stream consumed so far (the offset of the next header).
    pos: u64,
    /// Members larger than this are skipped unread (a corrupt size field or a stray video must
    /// not allocate gigabytes).
    max_member_bytes: u64,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Read exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first byte.
fn read_block(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated tar header")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn skip(r: &mut impl Read, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), &mut io::sink())?;
    if copied != n {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated tar member"));
    }
    Ok(())
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// Octal (NUL/space terminated) or GNU base-256 numeric field.
fn parse_number(field: &[u8]) -> io::Result<u64> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(b as u64))
                .ok_or_else(|| invalid("tar size overflows"))?;
        }
        return Ok(v);
    }
    let s = std::str::from_utf8(cstr(field)).map_err(|_| invalid("tar numeric field is not ASCII"))?;
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|_| invalid(format!("tar numeric field `{s}` is not octal")))
}

fn checksum_ok(header: &[u8; 512]) -> io::Result<bool> {
    let stored = parse_number(&header[148..156])?;
    let sum: u64 =
        header.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { b' ' as u64 } else { b as u64 }).sum();
    Ok(stored == sum)
}

impl<R: ShardStream> TarReader<R> {
    /// Members from the start of the stream; members over `max_member_bytes` are passed over.
    pub fn new(inner: R, max_member_bytes: u64) -> Self {
        Self { inner, finished: false, pos: 0, max_member_bytes }
    }

    /// Members from tar offset `offset` on (a header boundary an earlier read reported): seeked
    /// to where the stream can seek, read through otherwise.
    pub fn starting_at(mut inner: R, offset: u64, max_member_bytes: u64) -> io::Result<Self> {
        if offset > 0 && !inner.seek_forward(offset)? {
            skip(&mut inner, offset)?;
        }
        Ok(Self { inner, finished: false, pos: offset, max_member_bytes })
    }

    /// The tar offset of the next header.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn payload(&mut self, size: u64) -> io::Result<Vec<u8>> {
        // `size` is at most the member limit: allocate once instead of doubling up to it.
        let mut data = Vec::with_capacity(size as usize);
        (&mut self.inner).take(size).read_to_end(&mut data)?;
        if data.len() as u64 != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated tar member"));
        }
        self.pos += size;
        self.pad(size)?;
        Ok(data)
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        skip(&mut self.inner, n)?;
        self.pos += n;
        Ok(())
    }

    fn pad(&mut self, size: u64) -> io::Result<()> {
        self.skip((512 - size % 512) % 512)
    }

    /// Pass over `n` payload bytes and their padding: seeked over where the stream allows.
    fn pass_over(&mut self, size: u64) -> io::Result<()> {
        let padded = size.div_ceil(512) * 512;
        if padded > 0 && self.inner.seek_forward(padded)? {
            self.pos += padded;
            return Ok(());
        }
        self.skip(size)?;
        self.pad(size)
    }

    /// The next regular-file member, `Ok(None)` at the end of the archive. Members for which
    /// `skip(name)` holds are passed over unread and returned as [`Payload::Skipped`].
    pub fn next_member(&mut self, skip: &mut dyn FnMut(&str) -> bool) -> io::Result<Option<Member>> {
        let mut long_name: Option<String> = None;
        let mut header = [0u8; 512];
        let mut offset = self.pos;
        loop {
            let more = !self.finished && read_block(&mut self.inner, &mut header)?;
            if more {
                self.pos += 512;
            }
            if !more {
                // A stream that stops at a block boundary without the end-of-archive blocks
                // is accepted, as Python's tarfile does.
                self.finished = true;
                return Ok(None);
            }
            if header.iter().all(|&b| b == 0) {
                // The end-of-archive marker: the position stays at it, where a later read that
                // starts here finds the end again.
                self.pos -= 512;
                self.finished = true;
                return Ok(None);
            }
            if !checksum_ok(&header)? {
                return Err(invalid("tar header checksum mismatch (not a tar file, or corrupt)"));
            }
            let size = parse_number(&header[124..136])?;
            let kind = header[156];
            match kind {
                // pax extended header: only `path` matters to us.
                b'x' | b'L' => {
                    if size > 1 << 20 {
                        return Err(invalid("oversized tar extended header"));
                    }
                    let data = self.payload(size)?;
                    if kind == b'L' {
                        long_name = Some(String::from_utf8_lossy(cstr(&data)).into_owned());
                    } else {
                        long_name = pax_path(&data).or(long_name);
                    }
                }
                b'0' | 0 | b'7' => {
                    let name = long_name.take().unwrap_or_else(|| {
                        let name = String::from_utf8_lossy(cstr(&header[0..100])).into_owned();
                        let prefix = if &header[257..262] == b"ustar" { cstr(&header[345..500]) } else { &[] };
                        if prefix.is_empty() {
                            name
                        } else {
                            format!("{}/{}", String::from_utf8_lossy(prefix), name)
                        }
                    });
                    if skip(&name) {
                        self.pass_over(size)?;
                        return Ok(Some(Member { name, payload: Payload::Skipped, size, offset }));
                    }
                    if size > self.max_member_bytes {
                        self.pass_over(size)?;
                        return Ok(Some(Member { name, payload: Payload::TooLarge, size, offset }));
                    }
                    let data = self.payload(size)?;
                    return Ok(Some(Member { name, payload: Payload::Bytes(data), size, offset }));
                }
                // Directories, links, global pax headers, ...: not sample data.
                _ => {
                    self.pass_over(size)?;
                    long_name = None;
                    offset = self.pos;
                }
            }
        }
    }
}

/// `path=` record of a pax extended header (`"%d path=%s\n"` records).
fn pax_path(data: &[u8]) -> Option<String> {
    let mut rest = data;
    let mut path = None;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        if len <= space || len > rest.len() {
            return path;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(v) = record.strip_prefix(b"path=") {
            path = Some(String::from_utf8_lossy(v).into_owned());
        }
        rest = &rest[len..];
    }
    path
}

/// The ustar header of a regular file `name` of `size` bytes (tests and fixtures only).
pub fn ustar_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Writes a minimal ustar archive (tests and fixtures only).
pub fn write_tar(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in members {
        out.extend_from_slice(&ustar_header(name, data.len() as u64));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(bytes: &[u8]) -> io::Result<Vec<Member>> {
        let mut r = TarReader::new(bytes, 1 << 20);
        let mut v = Vec::new();
        while let Some(m) = r.next_member(&mut |_| false)? {
            v.push(m);
        }
        Ok(v)
    }

    #[test]
    fn reads_members_in_order() {
        let tar = write_tar(&[("a/0.jpg", b"xyz"), ("a/0.txt", b"")]);
        let m = all(&tar).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].name.as_str(), m[0].payload.bytes()), ("a/0.jpg", Some(&b"xyz"[..])));
        assert_eq!(m[1].payload.bytes(), Some(&b""[..]));
    }

    #[test]
    fn members_over_the_limit_are_passed_over_unread_and_positions_stay_right() {
        let tar = write_tar(&[("0.jpg", &[7u8; 3000]), ("0.txt", b"cap"), ("1.jpg", b"small")]);
        let mut r = TarReader::new(&tar[..], 2999);
        let big = r.next_member(&mut |_| false).unwrap().unwrap();
        assert_eq!((big.payload, big.size, big.offset), (Payload::TooLarge, 3000, 0));
        // 512 header + 3072 padded payload.
        let cap = r.next_member(&mut |_| false).unwrap().unwrap();
        assert_eq!((cap.payload.bytes(), cap.offset), (Some(&b"cap"[..]), 3584));
        let skipped = r.next_member(&mut |name| name == "1.jpg").unwrap().unwrap();
        assert_eq!((skipped.payload, skipped.offset), (Payload::Skipped, 4608));
        assert!(r.next_member(&mut |_| false).unwrap().is_none());
        assert_eq!(r.position(), 5632, "the end-of-archive marker");
    }

    #[test]
    fn truncation_and_garbage_are_errors_not_panics() {
        let tar = write_tar(&[("0.jpg", &[7u8; 1000]), ("0.txt", b"cap")]);
        for cut in [100, 512, 700, 1535, 1600] {
            let r = all(&tar[..cut]);
            assert!(r.is_err(), "cut at {cut} gave {:?}", r.map(|v| v.len()));
        }
        assert!(all(&[0x55u8; 2048]).is_err());
        assert!(all(b"").unwrap().is_empty());
    }
}
