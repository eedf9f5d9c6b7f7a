//! SPDY/3.1 as Kubernetes streams use it (`k8s.io/apimachinery/pkg/util/httpstream/spdy`, over
//! moby/spdystream): what kubelet speaks to the runtime when it proxies `kubectl exec`,
//! `attach` and `port-forward` (the API server translates kubectl's WebSocket into SPDY), and
//! crictl's default. The client opens streams (SYN_STREAM, headers naming the stream's role:
//! `streamType: stdin|stdout|stderr|error|resize|data`); the server answers each with SYN_REPLY
//! and then both sides send DATA frames, a FIN flag closing a side.
//!
//! Served here: frame parsing and writing (SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING,
//! GOAWAY, HEADERS, WINDOW_UPDATE, DATA), header blocks compressed with one zlib stream per
//! direction seeded with the SPDY/3 dictionary, and a [`Session`] that answers PINGs and
//! SYN_STREAMs and routes DATA to per-stream channels. Flow control windows are not enforced,
//! as spdystream enforces none. The frame functions are public for clients too (the tests'
//! SPDY client uses them). The SPDY/3 dictionary's length and Adler-32 are checked against
//! another implementation's (node's spdy-transport) in a unit test.

use std::collections::HashMap;
use std::sync::OnceLock;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;
pub const FLAG_FIN: u8 = 0x01;
/// Largest frame payload accepted (the length field allows 16 MiB; nothing here needs more).
const MAX_FRAME: usize = 1 << 20;
/// Largest decompressed header block accepted.
const MAX_HEADERS: usize = 64 << 10;
/// What one DATA frame carries at most when sending.
const MAX_DATA: usize = 32 << 10;

/// The zlib dictionary of SPDY/3 header blocks (draft 3, section 2.6.10.1): each of these
/// strings as a 4-byte big-endian length and the bytes, then [`DICTIONARY_TAIL`] as is.
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];
const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00",
    " Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

pub fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        let mut d = Vec::with_capacity(1423);
        for w in DICTIONARY_WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(DICTIONARY_TAIL.as_bytes());
        d
    })
}

/// Header names and values of a header block (names lower-case, as SPDY/3 requires).
pub type Headers = Vec<(String, String)>;

/// The value of header `name` (the first one).
pub fn header<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One frame as read.
#[derive(Debug, PartialEq)]
pub enum Frame {
    Data {
        stream: u32,
        fin: bool,
        data: Vec<u8>,
    },
    SynStream {
        stream: u32,
        fin: bool,
        headers: Headers,
    },
    SynReply {
        stream: u32,
        headers: Headers,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    Ping(u32),
    GoAway,
    /// SETTINGS, HEADERS, WINDOW_UPDATE and unknown control frames: nothing to do.
    Ignored,
}

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("spdy: {0}")]
    Io(#[from] std::io::Error),
    #[error("spdy: protocol error: {0}")]
    Protocol(String),
}

fn protocol(msg: impl Into<String>) -> SpdyError {
    SpdyError::Protocol(msg.into())
}

/// The compression side of a session: one zlib stream for every header block it sends.
pub struct HeaderWriter(Compress);

impl HeaderWriter {
    pub fn new() -> HeaderWriter {
        let mut c = Compress::new(Compression::default(), true);
        c.set_dictionary(dictionary())
            .expect("a fresh compressor takes a dictionary");
        HeaderWriter(c)
    }

    /// The compressed block for `headers` (ended with a sync flush, as SPDY requires).
    pub fn block(&mut self, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (n, v) in headers {
            raw.extend_from_slice(&(n.len() as u32).to_be_bytes());
            raw.extend_from_slice(n.as_bytes());
            raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
            raw.extend_from_slice(v.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            out.reserve(256);
            let before = self.0.total_in();
            // Output space is reserved above; compress_vec writes into the spare capacity.
            let _ = self.0.compress_vec(input, &mut out, FlushCompress::Sync);
            input = &input[(self.0.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                return out;
            }
        }
    }
}

impl Default for HeaderWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// The decompression side of a session.
pub struct HeaderReader(Decompress);

impl HeaderReader {
    pub fn new() -> HeaderReader {
        HeaderReader(Decompress::new(true))
    }

    pub fn block(&mut self, mut input: &[u8]) -> Result<Headers, SpdyError> {
        let mut raw: Vec<u8> = Vec::with_capacity(input.len() * 4 + 64);
        loop {
            if raw.len() >= MAX_HEADERS {
                return Err(protocol("header block too large"));
            }
            raw.reserve(1024);
            let before = self.0.total_in();
            match self
                .0
                .decompress_vec(input, &mut raw, FlushDecompress::Sync)
            {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(dictionary())
                        .map_err(|e| protocol(format!("header dictionary: {e}")))?;
                }
                Err(e) => return Err(protocol(format!("header block: {e}"))),
            }
            input = &input[(self.0.total_in() - before) as usize..];
            // Done when all input went in and zlib had room to spare for its output.
            if input.is_empty() && raw.len() < raw.capacity() {
                break;
            }
        }
        parse_headers(&raw)
    }
}

impl Default for HeaderReader {
    fn default() -> Self {
        Self::new()
    }
}

fn parse_headers(raw: &[u8]) -> Result<Headers, SpdyError> {
    let mut at = 0usize;
    let u32_at = |at: &mut usize| -> Result<usize, SpdyError> {
        let b = raw
            .get(*at..*at + 4)
            .ok_or_else(|| protocol("truncated header block"))?;
        *at += 4;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let n = u32_at(&mut at)?;
    let mut out = Vec::with_capacity(n.min(64));
    let text = |at: &mut usize, len: usize| -> Result<String, SpdyError> {
        let b = raw
            .get(*at..*at + len)
            .ok_or_else(|| protocol("truncated header block"))?;
        *at += len;
        String::from_utf8(b.to_vec()).map_err(|_| protocol("header is not UTF-8"))
    };
    for _ in 0..n {
        let len = u32_at(&mut at)?;
        let name = text(&mut at, len)?;
        let len = u32_at(&mut at)?;
        let value = text(&mut at, len)?;
        // Several values of one name are NUL-separated.
        for v in value.split('\0') {
            out.push((name.to_ascii_lowercase(), v.to_string()));
        }
    }
    Ok(out)
}

/// Reads one frame.
pub async fn read_frame(
    r: &mut (impl AsyncRead + Unpin),
    headers: &mut HeaderReader,
) -> Result<Frame, SpdyError> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head).await?;
    let flags = head[4];
    let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
    if len > MAX_FRAME {
        return Err(protocol(format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    let word = |at: usize| -> Result<u32, SpdyError> {
        body.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| protocol("truncated control frame"))
    };
    if head[0] & 0x80 == 0 {
        let stream = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
        return Ok(Frame::Data {
            stream,
            fin: flags & FLAG_FIN != 0,
            data: body,
        });
    }
    let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
    if version != VERSION {
        return Err(protocol(format!("SPDY version {version}, not 3")));
    }
    let kind = u16::from_be_bytes([head[2], head[3]]);
    Ok(match kind {
        SYN_STREAM => {
            let stream = word(0)? & 0x7fff_ffff;
            let block = body
                .get(10..)
                .ok_or_else(|| protocol("truncated SYN_STREAM"))?;
            Frame::SynStream {
                stream,
                fin: flags & FLAG_FIN != 0,
                headers: headers.block(block)?,
            }
        }
        SYN_REPLY => {
            let stream = word(0)? & 0x7fff_ffff;
            Frame::SynReply {
                stream,
                headers: headers.block(body.get(4..).unwrap_or_default())?,
            }
        }
        RST_STREAM => Frame::RstStream {
            stream: word(0)? & 0x7fff_ffff,
            status: word(4)?,
        },
        PING => Frame::Ping(word(0)?),
        GOAWAY => Frame::GoAway,
        HEADERS => {
            // Decompressed all the same: the zlib stream must stay in step.
            let _ = headers.block(body.get(4..).unwrap_or_default())?;
            Frame::Ignored
        }
        SETTINGS | WINDOW_UPDATE => Frame::Ignored,
        _ => Frame::Ignored,
    })
}

fn control(kind: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + body.len());
    f.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    f.extend_from_slice(&kind.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(body);
    f
}

/// A DATA frame.
pub fn data_frame(stream: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + data.len());
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.push(if fin { FLAG_FIN } else { 0 });
    f.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(data);
    f
}

/// A SYN_STREAM frame (what a client sends; the tests' client uses it).
pub fn syn_stream(
    w: &mut HeaderWriter,
    stream: u32,
    fin: bool,
    headers: &[(&str, &str)],
) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&stream.to_be_bytes());
    body.extend_from_slice(&0u32.to_be_bytes());
    body.extend_from_slice(&[0, 0]);
    body.extend_from_slice(&w.block(headers));
    control(SYN_STREAM, if fin { FLAG_FIN } else { 0 }, &body)
}

fn syn_reply(w: &mut HeaderWriter, stream: u32) -> Vec<u8> {
    let mut body = stream.to_be_bytes().to_vec();
    body.extend_from_slice(&w.block(&[]));
    control(SYN_REPLY, 0, &body)
}

fn goaway() -> Vec<u8> {
    control(GOAWAY, 0, &[0u8; 8])
}

/// A stream the client opened: its headers and what it sends (None: its side is closed).
pub(crate) struct Incoming {
    pub id: u32,
    pub headers: Headers,
    pub data: mpsc::Receiver<Vec<u8>>,
}

/// Writes frames for the handlers; clones share the connection.
#[derive(Clone)]
pub(crate) struct Writer(mpsc::Sender<Vec<u8>>);

impl Writer {
    /// Sends `data` on `stream` (split into frames of at most 32 KiB).
    pub(crate) async fn data(&self, stream: u32, data: &[u8]) -> bool {
        for chunk in data.chunks(MAX_DATA) {
            if self.0.send(data_frame(stream, false, chunk)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Closes our side of `stream`.
    pub(crate) async fn fin(&self, stream: u32) {
        let _ = self.0.send(data_frame(stream, true, &[])).await;
    }
}

/// One SPDY connection, server side: [`Session::start`] spawns the reader and the writer and
/// answers the stream of client-opened streams and a [`Writer`]. The connection closes (GOAWAY,
/// then the socket) once every [`Writer`] is gone.
pub(crate) struct Session;

impl Session {
    pub(crate) fn start<IO>(io: IO) -> (mpsc::Receiver<Incoming>, Writer)
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(io);
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
        // Control frames the reader answers by itself (they need the writer's compressor).
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<Control>(64);
        let (new_tx, new_rx) = mpsc::channel::<Incoming>(16);
        tokio::spawn(async move {
            let mut headers = HeaderWriter::new();
            loop {
                let frame = tokio::select! {
                    biased;
                    c = ctl_rx.recv() => match c {
                        Some(Control::Reply(id)) => syn_reply(&mut headers, id),
                        Some(Control::Pong(id)) => control(PING, 0, &id.to_be_bytes()),
                        None => continue,
                    },
                    f = out_rx.recv() => match f {
                        Some(f) => f,
                        None => break,
                    },
                };
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
            }
            let _ = wr.write_all(&goaway()).await;
            let _ = wr.shutdown().await;
        });
        tokio::spawn(async move {
            let mut headers = HeaderReader::new();
            let mut streams: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
            loop {
                let frame = match read_frame(&mut rd, &mut headers).await {
                    Ok(f) => f,
                    Err(SpdyError::Io(_)) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "spdy session");
                        return;
                    }
                };
                match frame {
                    Frame::SynStream {
                        stream,
                        fin,
                        headers,
                    } => {
                        let (tx, rx) = mpsc::channel(64);
                        if !fin {
                            streams.insert(stream, tx);
                        }
                        if ctl_tx.send(Control::Reply(stream)).await.is_err() {
                            return;
                        }
                        let incoming = Incoming {
                            id: stream,
                            headers,
                            data: rx,
                        };
                        if new_tx.send(incoming).await.is_err() {
                            // Nobody takes new streams any more; their data is dropped.
                        }
                    }
                    Frame::Data { stream, fin, data } => {
                        if let Some(tx) = streams.get(&stream)
                            && !data.is_empty()
                            && tx.send(data).await.is_err()
                        {
                            streams.remove(&stream);
                        }
                        if fin {
                            streams.remove(&stream);
                        }
                    }
                    Frame::RstStream { stream, .. } => {
                        streams.remove(&stream);
                    }
                    Frame::Ping(id) => {
                        if ctl_tx.send(Control::Pong(id)).await.is_err() {
                            return;
                        }
                    }
                    Frame::GoAway => return,
                    Frame::SynReply { .. } | Frame::Ignored => {}
                }
            }
        });
        (new_rx, Writer(out_tx))
    }
}

enum Control {
    Reply(u32),
    Pong(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_spdy3s() {
        // Length and Adler-32 of the SPDY/3 dictionary as another implementation
        // (node's spdy-transport 3.0.0) has it: a zlib peer rejects any other dictionary.
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        let (mut s1, mut s2) = (1u32, 0u32);
        for &b in d {
            s1 = (s1 + u32::from(b)) % 65521;
            s2 = (s2 + s1) % 65521;
        }
        assert_eq!((s2 << 16) | s1, 0xe3c6_a7c2);
    }

    #[tokio::test]
    async fn frames_round_trip_with_shared_compression_contexts() {
        let mut w = HeaderWriter::new();
        let mut r = HeaderReader::new();
        let mut wire = Vec::new();
        wire.extend(syn_stream(&mut w, 1, false, &[("streamtype", "error")]));
        wire.extend(syn_stream(
            &mut w,
            3,
            true,
            &[("streamtype", "stdout"), ("port", "80")],
        ));
        wire.extend(data_frame(3, true, b"hello"));
        wire.extend(control(PING, 0, &7u32.to_be_bytes()));
        let mut rd = &wire[..];
        assert_eq!(
            read_frame(&mut rd, &mut r).await.unwrap(),
            Frame::SynStream {
                stream: 1,
                fin: false,
                headers: vec![("streamtype".into(), "error".into())]
            }
        );
        let Frame::SynStream {
            stream,
            fin,
            headers,
        } = read_frame(&mut rd, &mut r).await.unwrap()
        else {
            panic!("not a SYN_STREAM");
        };
        assert_eq!((stream, fin), (3, true));
        assert_eq!(header(&headers, "port"), Some("80"));
        assert_eq!(
            read_frame(&mut rd, &mut r).await.unwrap(),
            Frame::Data {
                stream: 3,
                fin: true,
                data: b"hello".to_vec()
            }
        );
        assert_eq!(read_frame(&mut rd, &mut r).await.unwrap(), Frame::Ping(7));
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error_not_a_panic() {
        let mut r = HeaderReader::new();
        let mut bad = control(SYN_STREAM, 0, &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3]);
        let mut rd = &bad[..];
        assert!(matches!(
            read_frame(&mut rd, &mut r).await,
            Err(SpdyError::Protocol(_))
        ));
        bad = vec![0x80, 2, 0, 1, 0, 0, 0, 0];
        let mut rd = &bad[..];
        assert!(read_frame(&mut rd, &mut r).await.is_err());
        let huge = [0u8, 0, 0, 1, 0, 0xff, 0xff, 0xff];
        let mut rd = &huge[..];
        assert!(read_frame(&mut rd, &mut r).await.is_err());
    }
}
