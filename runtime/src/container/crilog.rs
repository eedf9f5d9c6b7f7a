//! The CRI log format kubelet reads: `<RFC3339Nano> <stdout|stderr> <F|P> <msg>\n`, one entry
//! per line of output; lines longer than 16 KiB are split into `P` (partial) entries ending
//! with an `F` (full) one. Output that ends without a newline is flushed as `F` at EOF, as
//! containerd does.
//!
//! [`LineSplitter`] is pure; [`CriLogWriter`] adds the file (append-only, reopened on request
//! after rotation). It must not buffer whole streams: memory stays under 2 x 16 KiB per stream.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Longest message in one entry.
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// One log entry's message and whether it completes a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub partial: bool,
    pub msg: &'a [u8],
}

/// Splits a byte stream into entries.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes; calls `emit` for every complete entry they finish.
    pub fn push(&mut self, mut data: &[u8], emit: &mut dyn FnMut(Entry<'_>)) {
        while !data.is_empty() {
            let room = MAX_LINE - self.pending.len();
            let window = &data[..data.len().min(room)];
            match window.iter().position(|b| *b == b'\n') {
                Some(nl) => {
                    if self.pending.is_empty() {
                        emit(Entry {
                            partial: false,
                            msg: &window[..nl],
                        });
                    } else {
                        self.pending.extend_from_slice(&window[..nl]);
                        emit(Entry {
                            partial: false,
                            msg: &self.pending,
                        });
                        self.pending.clear();
                    }
                    data = &data[nl + 1..];
                }
                None => {
                    self.pending.extend_from_slice(window);
                    data = &data[window.len()..];
                    if self.pending.len() == MAX_LINE {
                        emit(Entry {
                            partial: true,
                            msg: &self.pending,
                        });
                        self.pending.clear();
                    }
                }
            }
        }
    }

    /// At EOF: what is left becomes a full entry.
    pub fn finish(&mut self, emit: &mut dyn FnMut(Entry<'_>)) {
        if !self.pending.is_empty() {
            emit(Entry {
                partial: false,
                msg: &self.pending,
            });
            self.pending.clear();
        }
    }
}

/// Go's RFC3339Nano (trailing zeros of the fraction trimmed), which is what containerd writes.
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
    let base = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.timestamp_subsec_nanos();
    if nanos == 0 {
        return format!("{base}Z");
    }
    let frac = format!("{nanos:09}");
    format!("{base}.{}Z", frac.trim_end_matches('0'))
}

/// Formats one entry.
pub fn format_entry(out: &mut Vec<u8>, ts: &str, stream: Stream, e: &Entry<'_>) {
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.extend_from_slice(if e.partial { b" P " } else { b" F " });
    out.extend_from_slice(e.msg);
    out.push(b'\n');
}

/// A parsed log line (for `keel ctr logs` and tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub timestamp: String,
    pub stream: Stream,
    pub partial: bool,
    pub msg: String,
}

/// Parses one line of a CRI log file (without its newline).
pub fn parse_line(line: &str) -> Option<LogLine> {
    let mut it = line.splitn(4, ' ');
    let timestamp = it.next()?.to_string();
    let stream = match it.next()? {
        "stdout" => Stream::Stdout,
        "stderr" => Stream::Stderr,
        _ => return None,
    };
    let partial = match it.next()? {
        "P" => true,
        "F" => false,
        _ => return None,
    };
    Some(LogLine {
        timestamp,
        stream,
        partial,
        msg: it.next().unwrap_or("").to_string(),
    })
}

/// Writes entries of both streams to one append-only file.
pub struct CriLogWriter {
    path: PathBuf,
    file: File,
    stdout: LineSplitter,
    stderr: LineSplitter,
    buf: Vec<u8>,
}

fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl CriLogWriter {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(CriLogWriter {
            path: path.to_owned(),
            file: open_log(path)?,
            stdout: LineSplitter::default(),
            stderr: LineSplitter::default(),
            buf: Vec::with_capacity(4096),
        })
    }

    /// Reopens the path (after a rotator renamed the file away).
    pub fn reopen(&mut self) -> io::Result<()> {
        self.file = open_log(&self.path)?;
        Ok(())
    }

    /// Writes what `data` completes on `stream`.
    pub fn write(&mut self, stream: Stream, data: &[u8]) -> io::Result<()> {
        let ts = timestamp(chrono::Utc::now());
        let buf = &mut self.buf;
        buf.clear();
        let splitter = match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        splitter.push(data, &mut |e| format_entry(buf, &ts, stream, &e));
        self.flush_buf()
    }

    /// Flushes a stream's unterminated last line at its EOF.
    pub fn finish(&mut self, stream: Stream) -> io::Result<()> {
        let ts = timestamp(chrono::Utc::now());
        let buf = &mut self.buf;
        buf.clear();
        let splitter = match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        splitter.finish(&mut |e| format_entry(buf, &ts, stream, &e));
        self.flush_buf()
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all(&self.buf)?;
        }
        // Keep the buffer small after a burst of long lines.
        if self.buf.capacity() > 4 * MAX_LINE {
            self.buf = Vec::with_capacity(4096);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<(bool, Vec<u8>)> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut |e| out.push((e.partial, e.msg.to_vec())));
        }
        s.finish(&mut |e| out.push((e.partial, e.msg.to_vec())));
        out
    }

    #[test]
    fn lines_across_chunks() {
        let out = split(&[b"hel", b"lo\nwor", b"ld\n\nend"]);
        assert_eq!(
            out,
            vec![
                (false, b"hello".to_vec()),
                (false, b"world".to_vec()),
                (false, b"".to_vec()),
                (false, b"end".to_vec()),
            ]
        );
    }

    #[test]
    fn long_lines_split_at_16k() {
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let mut data = long.clone();
        data.push(b'\n');
        let out = split(&[&data[..1000], &data[1000..]]);
        assert_eq!(out.len(), 3);
        assert!(out[0].0 && out[1].0 && !out[2].0);
        assert_eq!(out[0].1.len(), MAX_LINE);
        assert_eq!(out[2].1.len(), 10);
        // exactly 16 KiB then newline: one P then an empty F
        let mut exact = vec![b'y'; MAX_LINE];
        exact.push(b'\n');
        let out = split(&[&exact]);
        assert_eq!(out.len(), 2);
        assert!(out[0].0 && !out[1].0 && out[1].1.is_empty());
    }

    #[test]
    fn timestamps_like_go() {
        use chrono::TimeZone;
        let t = chrono::Utc
            .timestamp_opt(1_475_713_029, 669_794_200)
            .unwrap();
        assert_eq!(timestamp(t), "2016-10-06T00:17:09.6697942Z");
        let t = chrono::Utc.timestamp_opt(1_475_713_029, 0).unwrap();
        assert_eq!(timestamp(t), "2016-10-06T00:17:09Z");
    }

    #[test]
    fn writer_formats_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.log");
        let mut w = CriLogWriter::open(&p).unwrap();
        w.write(Stream::Stdout, b"a b\npart").unwrap();
        w.write(Stream::Stderr, b"err\n").unwrap();
        std::fs::rename(&p, dir.path().join("c.log.1")).unwrap();
        w.reopen().unwrap();
        w.finish(Stream::Stdout).unwrap();
        let old = std::fs::read_to_string(dir.path().join("c.log.1")).unwrap();
        let lines: Vec<_> = old.lines().map(|l| parse_line(l).unwrap()).collect();
        assert_eq!(lines[0].msg, "a b");
        assert_eq!(lines[0].stream, Stream::Stdout);
        assert_eq!(lines[1].stream, Stream::Stderr);
        let new = std::fs::read_to_string(&p).unwrap();
        let l = parse_line(new.trim_end()).unwrap();
        assert_eq!((l.msg.as_str(), l.partial), ("part", false));
    }
}
