//! Layer compression: which codec a layer blob uses (from its media type, or sniffed from its first
//! bytes for imports whose media types cannot be trusted), the streaming decoder for it, and a
//! reader that hashes what flows through it (compressed digest and diffID in one pass).
//!
//! It owns no files and does no I/O of its own: callers hand it readers. It must not buffer a
//! whole layer in memory; everything here streams.

use std::io::{self, BufReader, Read};

use sha2::{Digest, Sha256};

/// Read buffer in front of the decompressors: large enough that a blob read from disk or from the
/// network is pulled in a few big reads rather than many small ones.
const INPUT_BUF: usize = 256 * 1024;

/// The codec of a layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CompressionError {
    /// The media type is not one of the OCI or Docker layer types keel can unpack.
    #[error("unsupported layer media type {0:?}")]
    UnsupportedMediaType(String),
}

impl Compression {
    /// The codec named by a layer descriptor's media type (OCI image-spec and Docker schema 2,
    /// including the non-distributable/foreign variants). Media type parameters (`; ...`) are
    /// ignored.
    pub fn from_media_type(media_type: &str) -> Result<Compression, CompressionError> {
        let base = media_type
            .split(';')
            .next()
            .unwrap_or(media_type)
            .trim()
            .to_ascii_lowercase();
        let c = match base.as_str() {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Compression::Zstd,
            _ => {
                return Err(CompressionError::UnsupportedMediaType(
                    media_type.to_owned(),
                ));
            }
        };
        Ok(c)
    }

    /// The codec guessed from a blob's first bytes (gzip `1f 8b`, zstd `28 b5 2f fd`); anything
    /// else is taken as a plain tar. Give it at least 4 bytes when the blob has them.
    pub fn detect(first_bytes: &[u8]) -> Compression {
        if first_bytes.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if first_bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The OCI media type keel records for a layer with this codec.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// A reader yielding the uncompressed bytes of `r`. Gzip streams made of several members (as
/// pigz and some registries produce) are read to the end, as are multi-frame zstd streams.
pub fn decoder<'a, R: Read + 'a>(c: Compression, r: R) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(
            BufReader::with_capacity(INPUT_BUF, r),
        )),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(
            BufReader::with_capacity(INPUT_BUF, r),
        )?),
    })
}

/// Passes reads through to `R` and hashes (sha256) every byte that went by.
///
/// Wrap the blob in one to get the compressed digest, and the decoder's output in another to get
/// the diffID; pass `&mut HashingReader` down so the digest can be read afterwards.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// `sha256:<hex>` of everything read so far.
    pub fn digest(&self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.clone().finalize()))
    }

    /// How many bytes have been read through this reader.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl<R> std::fmt::Debug for HashingReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashingReader")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn read_all(c: Compression, blob: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        decoder(c, blob).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn media_types_map_to_codecs() {
        use Compression::*;
        let cases = [
            ("application/vnd.oci.image.layer.v1.tar", None),
            ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
            ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar",
                None,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Gzip,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
                Zstd,
            ),
            ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Gzip,
            ),
            ("application/vnd.docker.image.rootfs.diff.tar.zstd", Zstd),
            ("application/vnd.oci.image.layer.v1.tar+gzip; foo=bar", Gzip),
        ];
        for (mt, want) in cases {
            assert_eq!(Compression::from_media_type(mt).unwrap(), want, "{mt}");
        }
        for c in [None, Gzip, Zstd] {
            assert_eq!(Compression::from_media_type(c.oci_media_type()).unwrap(), c);
        }
    }

    #[test]
    fn unknown_media_type_is_named_in_the_error() {
        let err = Compression::from_media_type("application/vnd.oci.image.config.v1+json")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("application/vnd.oci.image.config.v1+json"),
            "{err}"
        );
        assert!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+lz4").is_err()
        );
    }

    #[test]
    fn detects_by_magic() {
        assert_eq!(Compression::detect(&gzip(b"x")), Compression::Gzip);
        let z = zstd::encode_all(&b"x"[..], 1).unwrap();
        assert_eq!(Compression::detect(&z), Compression::Zstd);
        assert_eq!(Compression::detect(b"etc/\0\0\0"), Compression::None);
        assert_eq!(Compression::detect(&[]), Compression::None);
        assert_eq!(Compression::detect(&[0x1f]), Compression::None);
    }

    #[test]
    fn decoders_round_trip() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(read_all(Compression::None, &data), data);
        assert_eq!(read_all(Compression::Gzip, &gzip(&data)), data);
        let z = zstd::encode_all(&data[..], 3).unwrap();
        assert_eq!(read_all(Compression::Zstd, &z), data);
    }

    #[test]
    fn multi_member_gzip_is_read_to_the_end() {
        let mut blob = gzip(b"first ");
        blob.extend(gzip(b"second"));
        assert_eq!(read_all(Compression::Gzip, &blob), b"first second");
    }

    #[test]
    fn corrupt_gzip_is_an_error() {
        let mut blob = gzip(&[7u8; 10_000]);
        let n = blob.len();
        blob.truncate(n / 2);
        let mut out = Vec::new();
        assert!(
            decoder(Compression::Gzip, &blob[..])
                .unwrap()
                .read_to_end(&mut out)
                .is_err()
        );
    }

    #[test]
    fn hashing_reader_digests_what_went_through() {
        let mut r = HashingReader::new(&b""[..]);
        assert_eq!(r.digest(), EMPTY_SHA256);
        let mut sink = Vec::new();
        r.read_to_end(&mut sink).unwrap();
        assert_eq!(r.digest(), EMPTY_SHA256);

        let data = b"hello world\n";
        let mut r = HashingReader::new(&data[..]);
        let mut first = [0u8; 5];
        r.read_exact(&mut first).unwrap();
        assert_eq!(r.bytes_read(), 5);
        r.read_to_end(&mut sink).unwrap();
        assert_eq!(r.bytes_read(), data.len() as u64);
        assert_eq!(
            r.digest(),
            "sha256:a948904f2f0f479b8f8197694b30184b0d2ed1c1cd2a1ec0fb85d299a192a447"
        );
    }

    #[test]
    fn compressed_digest_and_diff_id_in_one_pass() {
        let data = vec![42u8; 100_000];
        let blob = gzip(&data);
        let mut compressed = HashingReader::new(&blob[..]);
        let mut uncompressed =
            HashingReader::new(decoder(Compression::Gzip, &mut compressed).unwrap());
        io::copy(&mut uncompressed, &mut io::sink()).unwrap();
        let diff_id = uncompressed.digest();
        drop(uncompressed);
        assert_eq!(compressed.bytes_read(), blob.len() as u64);
        assert_eq!(
            compressed.digest(),
            format!("sha256:{}", hex::encode(Sha256::digest(&blob)))
        );
        assert_eq!(
            diff_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&data)))
        );
    }
}
