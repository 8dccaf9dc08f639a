//! A minimal TensorBoard event-file writer for scalar summaries.
//!
//! Follows TensorFlow's on-disk format as `tensorboard/summary/writer/event_file_writer.py` and
//! `record_writer.py` write it: a file `events.out.tfevents.{secs}.{hostname}` of TFRecords, each
//! `u64 length | masked crc32c(length) | data | masked crc32c(data)` (little endian), whose data is
//! a serialized `tensorflow.Event` (`tensorflow/core/util/event.proto`). The first record carries
//! `file_version = "brain.Event:2"`, which readers use to recognise the format.
//!
//! We hand-declare only the protobuf fields we write (with `prost` derive) instead of depending on
//! `tensorboard-rs`, which is unmaintained and pulls protobuf 2 and an old `image`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

/// `tensorflow.Event`; only the fields we write. `file_version` and `summary` are members of the
/// `what` oneof in the .proto; as `optional` fields they encode identically.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`; `simple_value` is optional so that 0.0 is still written (it is a
/// oneof member in the .proto, where presence is what makes a value a scalar).
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// CRC-32C as TFRecord stores it: rotated and offset so that CRCs of data containing CRCs stay
/// well distributed (`tensorflow/core/lib/hash/crc32c.h`, `Mask`).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Frame `data` as one TFRecord.
fn write_record(out: &mut impl Write, data: &[u8]) -> io::Result<()> {
    let len = (data.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc32c(&len).to_le_bytes())?;
    out.write_all(data)?;
    out.write_all(&masked_crc32c(data).to_le_bytes())
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// This machine's name (`localhost` if it has none), as event file names and the run lock give it.
pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success
    // (or truncates, which we handle by searching for the NUL within the buffer).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Appends scalar summaries to one TensorBoard event file.
pub struct TensorBoardWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl TensorBoardWriter {
    /// Create `dir` if needed and start a new event file in it, named like TensorFlow's
    /// (`events.out.tfevents.{secs}.{hostname}`), with the `brain.Event:2` version record.
    pub fn create(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let wall_time = now_secs();
        let mut name = format!("events.out.tfevents.{}.{}", wall_time as u64, hostname());
        // Two writers started in the same second (e.g. a quick restart) must not clobber each other.
        let mut n = 1;
        while dir.join(&name).exists() {
            name = format!("events.out.tfevents.{}.{}.{n}", wall_time as u64, hostname());
            n += 1;
        }
        let path = dir.join(name);
        let mut writer = Self { out: BufWriter::new(File::create(&path)?), path };
        writer.write_event(&Event {
            wall_time,
            step: 0,
            file_version: Some("brain.Event:2".to_string()),
            summary: None,
        })?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Record `value` under `tag` at `step`. Buffered: call [`flush`](Self::flush) to make it visible.
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64) -> io::Result<()> {
        self.write_event(&Event {
            wall_time: now_secs(),
            step: step as i64,
            file_version: None,
            summary: Some(Summary {
                value: vec![SummaryValue { tag: tag.to_string(), simple_value: Some(value as f32) }],
            }),
        })
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn write_event(&mut self, event: &Event) -> io::Result<()> {
        write_record(&mut self.out, &event.encode_to_vec())
    }
}

impl Drop for TensorBoardWriter {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check values from the CRC-32C (Castagnoli) definition and TFRecord's mask, as computed by
    /// `tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c`.
    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC-32C("123456789") = 0xe3069283 (the standard check value).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // TensorFlow's mask: ((crc >> 15) | (crc << 17)) + 0xa282ead8, evaluated in Python.
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        // Python: masked_crc32c(b"") -> 2726488792 (crc32c("") = 0, so mask(0) = 0xa282ead8).
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
    }

    /// Parse the records back by hand: framing and CRCs intact, events decode with our values.
    #[test]
    fn records_frame_and_decode() {
        let dir = std::env::temp_dir().join(format!("ferroclip-tb-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = TensorBoardWriter::create(&dir).unwrap();
        w.add_scalar("train/loss", 0.0, 3).unwrap();
        w.add_scalar("train/lr", 1.5e-4, 4).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        assert!(path.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
        let bytes = std::fs::read(&path).unwrap();
        let mut events = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let len_bytes = &bytes[pos..pos + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc32c(len_bytes));
            let data = &bytes[pos + 12..pos + 12 + len];
            let data_crc = u32::from_le_bytes(bytes[pos + 12 + len..pos + 16 + len].try_into().unwrap());
            assert_eq!(data_crc, masked_crc32c(data));
            events.push(Event::decode(data).unwrap());
            pos += 16 + len;
        }
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let v = &events[1].summary.as_ref().unwrap().value[0];
        assert_eq!((events[1].step, v.tag.as_str(), v.simple_value), (3, "train/loss", Some(0.0)));
        let v = &events[2].summary.as_ref().unwrap().value[0];
        assert_eq!((events[2].step, v.tag.as_str(), v.simple_value), (4, "train/lr", Some(1.5e-4)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
