//! Container logs as `kubectl logs` shows them, read from the CRI log files the runtime writes
//! (`<pod_log_dir>/<namespace>_<name>_<uid>/<container>/<attempt>.log`, lines of
//! `<RFC3339Nano> <stdout|stderr> <F|P> <message>`): which file, which lines (tail, since), how
//! each line is shown (timestamps, partial lines joined), and the byte limit. Pure except for
//! [`log_file`] and [`tail_offset`], which read the file system; following a file is the
//! server's loop (`log_server.rs`).

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

/// What a log request asks for (kubelet's `containerLogs` query parameters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LogOptions {
    pub pod_uid: Option<String>,
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    pub limit_bytes: Option<u64>,
    pub since: Option<DateTime<Utc>>,
}

impl LogOptions {
    /// Parses a query string; the error names the parameter.
    pub fn parse(query: &str, now: DateTime<Utc>) -> Result<LogOptions, String> {
        let mut o = LogOptions::default();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = percent_decode(v);
            let flag = |v: &str| match v {
                "" | "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(format!("{k}={v:?}: must be true or false")),
            };
            let count = |v: &str, min: u64| {
                v.parse::<u64>()
                    .ok()
                    .filter(|n| *n >= min)
                    .ok_or_else(|| format!("{k}={v:?}: must be an integer >= {min}"))
            };
            match k {
                "podUID" => o.pod_uid = Some(v).filter(|u| !u.is_empty()),
                "follow" => o.follow = flag(&v)?,
                "previous" => o.previous = flag(&v)?,
                "timestamps" => o.timestamps = flag(&v)?,
                "tailLines" => o.tail_lines = Some(count(&v, 0)?),
                "limitBytes" => o.limit_bytes = Some(count(&v, 1)?),
                "sinceSeconds" => {
                    let s = count(&v, 1)?;
                    o.since = Some(now - chrono::Duration::seconds(s.min(i64::MAX as u64) as i64));
                }
                "sinceTime" => {
                    let t = DateTime::parse_from_rfc3339(&v)
                        .map_err(|e| format!("sinceTime={v:?}: not an RFC 3339 time: {e}"))?;
                    o.since = Some(t.with_timezone(&Utc));
                }
                _ => {}
            }
        }
        Ok(o)
    }
}

/// One line of a CRI log file.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct CriLine<'a> {
    pub time: &'a str,
    /// False for a `P` part: the message continues in the next line.
    pub full: bool,
    pub message: &'a [u8],
}

/// Splits one line (without its `\n`); None when it is not in the CRI format.
pub(crate) fn parse_line(line: &[u8]) -> Option<CriLine<'_>> {
    let mut fields = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(fields.next()?).ok()?;
    let stream = fields.next()?;
    if stream != b"stdout" && stream != b"stderr" {
        return None;
    }
    let tag = fields.next()?;
    let full = match tag.split(|b| *b == b':').next()? {
        b"F" => true,
        b"P" => false,
        _ => return None,
    };
    Some(CriLine {
        time,
        full,
        message: fields.next().unwrap_or_default(),
    })
}

/// Appends what `line` (one file line, without its `\n`) shows under `o`: its message, a newline
/// if it ends a line, its timestamp first if asked for. Lines before `since` and lines not in
/// the CRI format show nothing.
pub(crate) fn render(line: &[u8], o: &LogOptions, out: &mut Vec<u8>) {
    let Some(l) = parse_line(line) else { return };
    if let Some(since) = o.since {
        match DateTime::parse_from_rfc3339(l.time) {
            Ok(t) if t.with_timezone(&Utc) < since => return,
            Ok(_) => {}
            Err(_) => return,
        }
    }
    if o.timestamps {
        out.extend_from_slice(l.time.as_bytes());
        out.push(b' ');
    }
    out.extend_from_slice(l.message);
    if l.full {
        out.push(b'\n');
    }
}

/// Why no log file can be shown.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NoLog {
    /// No such pod (or container) has run on this node.
    NotFound(String),
    /// The container has not started yet, or has no previous attempt.
    BadRequest(String),
}

/// The log file of `container` in the pod whose log directory is `pod_dir`: its latest attempt,
/// or the one before with `previous`; with the attempt number.
pub(crate) fn log_file(
    pod_dir: &Path,
    pod: &str,
    container: &str,
    previous: bool,
) -> Result<(PathBuf, u32), NoLog> {
    let dir = pod_dir.join(container);
    let mut attempts: Vec<u32> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".log")?
                    .parse::<u32>()
                    .ok()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    attempts.sort_unstable();
    let pick = if previous {
        attempts.iter().rev().nth(1)
    } else {
        attempts.last()
    };
    match pick {
        Some(a) => Ok((dir.join(format!("{a}.log")), *a)),
        None if previous => Err(NoLog::BadRequest(format!(
            "previous terminated container \"{container}\" in pod \"{pod}\" not found"
        ))),
        None => Err(NoLog::BadRequest(format!(
            "container \"{container}\" in pod \"{pod}\" is waiting to start: no log yet"
        ))),
    }
}

/// The pod's log directory under `root`: `<namespace>_<name>_<uid>`, with `uid` if known, else
/// the most recently changed directory of that pod name.
pub(crate) fn pod_dir(
    root: &Path,
    namespace: &str,
    name: &str,
    uid: Option<&str>,
) -> Result<PathBuf, NoLog> {
    let missing = || NoLog::NotFound(format!("pod {namespace}/{name} has no logs on this node"));
    if let Some(uid) = uid {
        let d = root.join(format!("{namespace}_{name}_{uid}"));
        return if d.is_dir() { Ok(d) } else { Err(missing()) };
    }
    let prefix = format!("{namespace}_{name}_");
    std::fs::read_dir(root)
        .map_err(|_| missing())?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .is_some_and(|uid| !uid.contains('_'))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, p)| p)
        .ok_or_else(missing)
}

/// Where the last `lines` lines of the file begin (0 if it has fewer). Reads backwards in
/// blocks, so a tail of a large file does not read all of it.
pub(crate) fn tail_offset(f: &mut std::fs::File, lines: u64) -> std::io::Result<u64> {
    const BLOCK: u64 = 64 * 1024;
    let len = f.seek(SeekFrom::End(0))?;
    if lines == 0 {
        return Ok(len);
    }
    let mut end = len;
    let mut newlines = 0u64;
    let mut buf = vec![0u8; BLOCK as usize];
    // A final line without its newline still counts as a line.
    let mut skip_last = true;
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        for i in (0..n).rev() {
            if buf[i] != b'\n' {
                skip_last = false;
                continue;
            }
            if skip_last && start + i as u64 == len - 1 {
                // The newline ending the file's last line.
                skip_last = false;
                continue;
            }
            newlines += 1;
            if newlines == lines {
                return Ok(start + i as u64 + 1);
            }
        }
        end = start;
    }
    Ok(0)
}

/// Cuts `chunk` so that at most `limit` bytes are sent in all; true when the limit is reached.
pub(crate) fn apply_limit(chunk: &mut Vec<u8>, sent: &mut u64, limit: Option<u64>) -> bool {
    let Some(limit) = limit else {
        *sent += chunk.len() as u64;
        return false;
    };
    let room = limit.saturating_sub(*sent);
    if chunk.len() as u64 >= room {
        chunk.truncate(room as usize);
        *sent = limit;
        return true;
    }
    *sent += chunk.len() as u64;
    false
}

/// Decodes `%XX` escapes and `+`.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn show(lines: &[&str], o: &LogOptions) -> String {
        let mut out = Vec::new();
        for l in lines {
            render(l.as_bytes(), o, &mut out);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_show_their_message_and_parts_join() {
        let lines = [
            "2026-12-02T01:00:00.000000001Z stdout F hello world",
            "2026-12-02T01:00:01.5Z stderr P part one, ",
            "2026-12-02T01:00:01.6Z stderr F part two",
            "garbage",
            "2026-12-02T01:00:02Z stdout F ",
        ];
        let o = LogOptions::default();
        assert_eq!(show(&lines, &o), "hello world\npart one, part two\n\n");
        let o = LogOptions {
            timestamps: true,
            ..Default::default()
        };
        assert_eq!(
            show(&lines[..1], &o),
            "2026-12-02T01:00:00.000000001Z hello world\n"
        );
        let since = DateTime::parse_from_rfc3339("2026-12-02T01:00:01Z").unwrap();
        let o = LogOptions {
            since: Some(since.with_timezone(&Utc)),
            ..Default::default()
        };
        assert_eq!(show(&lines, &o), "part one, part two\n\n");
    }

    #[test]
    fn options_parse_and_name_bad_values() {
        let now = Utc::now();
        let o = LogOptions::parse(
            "podUID=u1&follow=true&tailLines=3&timestamps=1&limitBytes=10",
            now,
        )
        .unwrap();
        assert_eq!(o.pod_uid.as_deref(), Some("u1"));
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!((o.tail_lines, o.limit_bytes), (Some(3), Some(10)));
        let o = LogOptions::parse("sinceSeconds=10", now).unwrap();
        assert_eq!(o.since, Some(now - chrono::Duration::seconds(10)));
        let o = LogOptions::parse("sinceTime=2026-12-02T01%3A00%3A00Z", now).unwrap();
        assert!(o.since.is_some());
        for bad in [
            "tailLines=-1",
            "limitBytes=0",
            "follow=maybe",
            "sinceTime=yesterday",
        ] {
            let e = LogOptions::parse(bad, now).unwrap_err();
            assert!(e.starts_with(bad.split('=').next().unwrap()), "{e}");
        }
    }

    #[test]
    fn tail_finds_the_last_lines() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"a\nbb\nccc\n").unwrap();
        assert_eq!(tail_offset(&mut f, 1).unwrap(), 5);
        assert_eq!(tail_offset(&mut f, 2).unwrap(), 2);
        assert_eq!(tail_offset(&mut f, 3).unwrap(), 0);
        assert_eq!(tail_offset(&mut f, 10).unwrap(), 0);
        assert_eq!(tail_offset(&mut f, 0).unwrap(), 9);
        // A last line still being written counts as a line.
        f.write_all(b"dd").unwrap();
        assert_eq!(tail_offset(&mut f, 1).unwrap(), 9);
        // Across block boundaries.
        let mut big = tempfile::tempfile().unwrap();
        let line = vec![b'x'; 999];
        for _ in 0..200 {
            big.write_all(&line).unwrap();
            big.write_all(b"\n").unwrap();
        }
        assert_eq!(tail_offset(&mut big, 150).unwrap(), 50 * 1000);
    }

    #[test]
    fn files_are_picked_by_attempt() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("app");
        std::fs::create_dir_all(&c).unwrap();
        assert!(matches!(
            log_file(d.path(), "p", "app", false),
            Err(NoLog::BadRequest(_))
        ));
        for a in [0, 2, 10] {
            std::fs::write(c.join(format!("{a}.log")), "").unwrap();
        }
        assert_eq!(log_file(d.path(), "p", "app", false).unwrap().1, 10);
        assert_eq!(log_file(d.path(), "p", "app", true).unwrap().1, 2);
        std::fs::create_dir_all(d.path().join("ns_web_u1")).unwrap();
        std::fs::create_dir_all(d.path().join("ns_web-2_u2")).unwrap();
        assert_eq!(
            pod_dir(d.path(), "ns", "web", None).unwrap(),
            d.path().join("ns_web_u1")
        );
        assert!(matches!(
            pod_dir(d.path(), "ns", "web", Some("zz")),
            Err(NoLog::NotFound(_))
        ));
    }

    #[test]
    fn the_limit_cuts_the_output() {
        let mut sent = 0;
        let mut a = b"hello".to_vec();
        assert!(!apply_limit(&mut a, &mut sent, Some(8)));
        let mut b = b"world".to_vec();
        assert!(apply_limit(&mut b, &mut sent, Some(8)));
        assert_eq!(b, b"wor");
    }
}
