//! Decoding of Kubernetes protobuf request bodies for the few kinds kubectl's generator commands
//! send that way (`kubectl create namespace|configmap|secret`): client-go's typed clients encode
//! built-in objects as `application/vnd.kubernetes.protobuf` and do not retry with JSON.
//!
//! The envelope is the 4-byte magic `k8s\0` and a `runtime.Unknown` message whose `raw` field holds
//! the object's message. Only the fields of Namespace, ConfigMap, Secret and the parts of
//! ObjectMeta a new object carries are read (field numbers from the upstream `generated.proto`);
//! unknown fields are skipped. Written by hand: no Rust crate carries these schemas, and generating
//! the full set for three kinds would dwarf the rest of the server. Responses are always JSON.

use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::status::ApiError;

const MAGIC: &[u8] = b"k8s\0";

fn bad(why: &str) -> ApiError {
    ApiError::bad_request(format!("invalid protobuf body: {why}"))
}

/// One decoded field: number and value.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, ApiError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or_else(|| bad("truncated varint"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(bad("varint too long"))
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, ApiError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let tag = varint(buf, &mut pos)?;
        let (num, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => out.push((num, Field::Varint(varint(buf, &mut pos)?))),
            1 => pos += 8,
            5 => pos += 4,
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|_| bad("length"))?;
                let end = pos
                    .checked_add(len)
                    .filter(|e| *e <= buf.len())
                    .ok_or_else(|| bad("truncated field"))?;
                out.push((num, Field::Bytes(&buf[pos..end])));
                pos = end;
            }
            _ => return Err(bad(&format!("unsupported wire type {wire}"))),
        }
    }
    if pos > buf.len() {
        return Err(bad("truncated fixed field"));
    }
    Ok(out)
}

fn string(b: &[u8]) -> Result<String, ApiError> {
    String::from_utf8(b.to_vec()).map_err(|_| bad("string field is not UTF-8"))
}

/// A `map<string, string>` (or bytes, base64-encoded as JSON does) entry.
fn map_entry(b: &[u8], bytes_value: bool) -> Result<(String, Value), ApiError> {
    let (mut k, mut v) = (String::new(), Value::String(String::new()));
    for (n, f) in fields(b)? {
        if let Field::Bytes(x) = f {
            match n {
                1 => k = string(x)?,
                2 if bytes_value => v = json!(base64::engine::general_purpose::STANDARD.encode(x)),
                2 => v = json!(string(x)?),
                _ => {}
            }
        }
    }
    Ok((k, v))
}

fn insert_entry(obj: &mut Value, field: &str, b: &[u8], bytes_value: bool) -> Result<(), ApiError> {
    let (k, v) = map_entry(b, bytes_value)?;
    if !obj[field].is_object() {
        obj[field] = Value::Object(Map::new());
    }
    obj[field][k] = v;
    Ok(())
}

fn object_meta(b: &[u8]) -> Result<Value, ApiError> {
    let mut m = json!({});
    for (n, f) in fields(b)? {
        let Field::Bytes(x) = f else { continue };
        match n {
            1 => m["name"] = json!(string(x)?),
            2 => m["generateName"] = json!(string(x)?),
            3 => m["namespace"] = json!(string(x)?),
            6 => m["resourceVersion"] = json!(string(x)?),
            11 => insert_entry(&mut m, "labels", x, false)?,
            12 => insert_entry(&mut m, "annotations", x, false)?,
            14 => {
                let fins = m["finalizers"].as_array().cloned().unwrap_or_default();
                let mut fins = fins;
                fins.push(json!(string(x)?));
                m["finalizers"] = json!(fins);
            }
            _ => {}
        }
    }
    Ok(m)
}

/// Decodes a protobuf body into the JSON object of `kind`.
pub fn decode(kind: &str, body: &[u8]) -> Result<Value, ApiError> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("missing the k8s protobuf magic"))?;
    let mut raw = None;
    for (n, f) in fields(rest)? {
        if let (2, Field::Bytes(x)) = (n, f) {
            raw = Some(x);
        }
    }
    let raw = raw.ok_or_else(|| bad("no object in the envelope"))?;
    let mut obj = json!({});
    for (n, f) in fields(raw)? {
        match (kind, n, f) {
            (_, 1, Field::Bytes(x)) => obj["metadata"] = object_meta(x)?,
            ("Namespace", 2, Field::Bytes(x)) => {
                let mut fins = Vec::new();
                for (sn, sf) in fields(x)? {
                    if let (1, Field::Bytes(s)) = (sn, sf) {
                        fins.push(json!(string(s)?));
                    }
                }
                if !fins.is_empty() {
                    obj["spec"] = json!({"finalizers": fins});
                }
            }
            ("ConfigMap", 2, Field::Bytes(x)) => insert_entry(&mut obj, "data", x, false)?,
            ("ConfigMap", 3, Field::Bytes(x)) => insert_entry(&mut obj, "binaryData", x, true)?,
            ("ConfigMap", 4, Field::Varint(v)) | ("Secret", 5, Field::Varint(v)) => {
                obj["immutable"] = json!(v != 0)
            }
            ("Secret", 2, Field::Bytes(x)) => insert_entry(&mut obj, "data", x, true)?,
            ("Secret", 3, Field::Bytes(x)) => obj["type"] = json!(string(x)?),
            ("Secret", 4, Field::Bytes(x)) => insert_entry(&mut obj, "stringData", x, false)?,
            ("Namespace" | "ConfigMap" | "Secret", _, _) => {}
            _ => {
                return Err(ApiError::unsupported_media_type(&format!(
                    "application/vnd.kubernetes.protobuf (only Namespace, ConfigMap and Secret bodies may be protobuf; send {kind} as JSON, e.g. with kubectl apply)"
                )));
            }
        }
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(num: u64, b: &[u8]) -> Vec<u8> {
        let mut out = vec![(num << 3 | 2) as u8, b.len() as u8];
        out.extend_from_slice(b);
        out
    }

    fn entry(k: &str, v: &[u8]) -> Vec<u8> {
        [ld(1, k.as_bytes()), ld(2, v)].concat()
    }

    #[test]
    fn decodes_a_secret_from_kubectl() {
        let meta = [ld(1, b"s1"), ld(3, b"default"), ld(11, &entry("app", b"x"))].concat();
        let secret = [
            ld(1, &meta),
            ld(2, &entry("pw", b"hunter2")),
            ld(3, b"Opaque"),
        ]
        .concat();
        let unknown = [
            ld(1, &[ld(1, b"v1"), ld(2, b"Secret")].concat()),
            ld(2, &secret),
        ]
        .concat();
        let body = [MAGIC.to_vec(), unknown].concat();
        let obj = decode("Secret", &body).unwrap();
        assert_eq!(obj["metadata"]["name"], "s1");
        assert_eq!(obj["metadata"]["labels"]["app"], "x");
        assert_eq!(obj["data"]["pw"], "aHVudGVyMg==");
        assert_eq!(obj["type"], "Opaque");
        assert_eq!(
            decode("Pod", &[MAGIC.to_vec(), ld(2, &ld(2, b"x"))].concat())
                .unwrap_err()
                .code,
            415
        );
        assert_eq!(decode("Secret", b"{}").unwrap_err().code, 400);
        assert_eq!(
            decode("Secret", &[MAGIC.to_vec(), vec![0x12, 0x7f]].concat())
                .unwrap_err()
                .code,
            400
        );
    }
}
