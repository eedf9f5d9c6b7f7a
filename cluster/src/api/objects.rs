//! The generic object operations every resource shares, independent of HTTP: get, list a page,
//! create, update through a closure (PUT, the patch types, status and scale all go through it),
//! and delete with grace periods, finalizers and propagation policies.
//!
//! Objects are JSON in the store without `metadata.resourceVersion`; reads fill it from the key's
//! mod revision, so the resourceVersion is the store revision. Writes are compare-and-swap on the
//! revision that was read. Must not parse requests or format responses (see `handlers.rs`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::alloc::Allocator;
use super::auth::Tokens;
use super::defaults;
use super::resources::{self, Resource};
use super::selectors::{FieldSelector, LabelSelector};
use super::status::ApiError;
use crate::store::{KeyValue, ListOptions, Store, StoreError};

/// How often a write that lost a compare-and-swap race is retried when the caller did not pin a
/// resourceVersion.
const CAS_RETRIES: usize = 8;

/// The most keys one store read of a list fetches.
const STORE_CHUNK: usize = 500;

/// What every request handler shares.
pub struct State {
    pub store: Arc<dyn Store>,
    pub tokens: Tokens,
    pub alloc: Allocator,
    /// Wakes the garbage collector after a delete.
    pub gc_wake: Arc<Notify>,
    pub bookmark_interval: Duration,
    /// Namespaces recently seen active, so creates need not read their namespace every time.
    pub active_namespaces: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// How long a namespace seen active is trusted without reading it again. Kubernetes' namespace
/// admission reads an informer cache, which lags the same way; a namespace deleted on another
/// server sharing the etcd may take this long to refuse creates.
const NAMESPACE_TTL: Duration = Duration::from_secs(1);

/// Now, as Kubernetes writes timestamps.
pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn later(secs: i64) -> String {
    (Utc::now() + chrono::Duration::seconds(secs)).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A random RFC 4122 version 4 UUID.
pub fn uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = super::pki::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// The object stored under `kv`, with its resourceVersion.
pub fn decode(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&kv.value).map_err(|e| {
        ApiError::internal(format!(
            "{}: stored object is not JSON: {e}",
            String::from_utf8_lossy(&kv.key)
        ))
    })?;
    set_rv(&mut v, kv.mod_revision);
    Ok(v)
}

pub fn set_rv(v: &mut Value, rev: i64) {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("resourceVersion".into(), json!(rev.to_string()));
    }
}

fn encode(obj: &Value) -> Bytes {
    // Creates never carry a resourceVersion: serialize as is rather than copy the whole object.
    if obj.pointer("/metadata/resourceVersion").is_none() {
        return Bytes::from(serde_json::to_vec(obj).unwrap_or_default());
    }
    let mut o = obj.clone();
    if let Some(m) = o.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    Bytes::from(serde_json::to_vec(&o).unwrap_or_default())
}

pub fn meta_str<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn parse_rv(obj: &Value) -> Result<Option<i64>, ApiError> {
    match meta_str(obj, "resourceVersion") {
        "" => Ok(None),
        s => s.parse().map(Some).map_err(|_| {
            ApiError::bad_request(format!(
                "metadata.resourceVersion {s:?} is not a valid resource version"
            ))
        }),
    }
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect()
}

fn set_finalizers(obj: &mut Value, f: &[String]) {
    if f.is_empty() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("finalizers");
        }
    } else {
        obj["metadata"]["finalizers"] = json!(f);
    }
}

/// The current object and its revision.
pub async fn get(
    state: &State,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
) -> Result<(Value, i64), ApiError> {
    let got = state.store.get(res.key(ns, name).as_bytes()).await?;
    let kv = got
        .kv
        .ok_or_else(|| ApiError::not_found(res.group, res.plural, name))?;
    Ok((decode(&kv)?, kv.mod_revision))
}

/// One page of a filtered list.
pub struct Page {
    pub items: Vec<Value>,
    pub revision: i64,
    /// The continue token when more items may follow.
    pub cont: Option<String>,
}

/// What a list reads.
#[derive(Debug, Default)]
pub struct ListQuery<'a> {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// At most this many items; 0: all.
    pub limit: usize,
    /// A continue token of an earlier page.
    pub cont: Option<&'a str>,
    /// Read at this revision; None: now.
    pub at: Option<i64>,
}

/// Lists the objects matching `q`.
pub async fn list(
    state: &State,
    res: &Resource,
    ns: Option<&str>,
    q: &ListQuery<'_>,
) -> Result<Page, ApiError> {
    let (labels, fields, limit, cont, at) = (&q.labels, &q.fields, q.limit, q.cont, q.at);
    let prefix = res.list_prefix(ns);
    let (mut revision, mut start) = match cont {
        Some(c) => {
            let (rev, start) = decode_continue(c)?;
            if !start.starts_with(prefix.as_bytes()) {
                return Err(ApiError::bad_request(
                    "continue token does not belong to this list",
                ));
            }
            (Some(rev), Some(Bytes::from(start)))
        }
        None => (at, None),
    };
    let mut items = Vec::new();
    loop {
        // Read the store in bounded chunks: etcd answers at most 4 MiB per gRPC message.
        let want = if limit == 0 {
            STORE_CHUNK
        } else {
            (limit - items.len()).clamp(64, STORE_CHUNK)
        };
        let page = state
            .store
            .list(prefix.as_bytes(), ListOptions { revision, limit: want, start: start.clone() })
            .await
            .map_err(|e| match e {
                StoreError::Compacted { .. } if cont.is_some() => ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                ),
                e => e.into(),
            })?;
        revision = Some(page.revision);
        let mut stopped_at = None;
        for kv in &page.items {
            if limit != 0 && items.len() == limit {
                stopped_at = Some(kv.key.clone());
                break;
            }
            // Namespaced prefixes of all namespaces also match deeper keys; a list of one
            // namespace must not see another whose name extends it: the prefix ends with '/'.
            let obj = decode(kv)?;
            if labels.matches(&obj) && fields.matches(&obj) {
                items.push(obj);
            }
        }
        if let Some(k) = stopped_at {
            return Ok(Page {
                items,
                revision: page.revision,
                cont: Some(encode_continue(page.revision, &k)),
            });
        }
        match page.next {
            None => {
                return Ok(Page {
                    items,
                    revision: page.revision,
                    cont: None,
                });
            }
            Some(next) if limit != 0 && items.len() == limit => {
                return Ok(Page {
                    items,
                    revision: page.revision,
                    cont: Some(encode_continue(page.revision, &next)),
                });
            }
            Some(next) => start = Some(next),
        }
    }
}

fn encode_continue(rev: i64, start: &[u8]) -> String {
    use base64::Engine as _;
    let t = json!({"v": "keel.continue/1", "rv": rev, "start": String::from_utf8_lossy(start)});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(t.to_string())
}

fn decode_continue(c: &str) -> Result<(i64, Vec<u8>), ApiError> {
    use base64::Engine as _;
    let bad = || ApiError::bad_request(format!("continue token {c:?} is not valid"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rev = v["rv"].as_i64().ok_or_else(bad)?;
    let start = v["start"].as_str().ok_or_else(bad)?;
    Ok((rev, start.as_bytes().to_vec()))
}

/// Checks that the namespace exists and is not being deleted.
async fn check_namespace(state: &State, ns: &str) -> Result<(), ApiError> {
    let fresh = |t: &std::time::Instant| t.elapsed() < NAMESPACE_TTL;
    if state
        .active_namespaces
        .lock()
        .is_ok_and(|c| c.get(ns).is_some_and(fresh))
    {
        return Ok(());
    }
    let nsr = resources::lookup("", "v1", "namespaces").expect("namespaces is served");
    let (obj, _) = get(state, nsr, None, ns).await?;
    if obj.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(ApiError::forbidden(format!(
            "unable to create new content in namespace {ns} because it is being terminated"
        )));
    }
    if let Ok(mut c) = state.active_namespaces.lock() {
        c.retain(|_, t| fresh(t));
        c.insert(ns.to_string(), std::time::Instant::now());
    }
    Ok(())
}

const NAME_CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// Creates `obj` in `ns`. Returns the stored object.
pub async fn create(
    state: &State,
    res: &Resource,
    ns: Option<&str>,
    mut obj: Value,
) -> Result<Value, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request(format!(
            "the body must be a {} object",
            res.kind
        )));
    }
    check_type_meta(res, &mut obj)?;
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    if res.namespaced {
        let ns = ns.ok_or_else(|| {
            ApiError::bad_request(format!("{} must be created in a namespace", res.plural))
        })?;
        let body_ns = meta_str(&obj, "namespace");
        if !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        obj["metadata"]["namespace"] = json!(ns);
        check_namespace(state, ns).await?;
    } else if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    let generate = meta_str(&obj, "generateName").to_string();
    let given_name = meta_str(&obj, "name").is_empty();
    {
        let m = obj["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        m.insert("uid".into(), json!(uuid()));
        m.insert("creationTimestamp".into(), json!(now()));
        m.insert("generation".into(), json!(1));
        for f in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            m.remove(f);
        }
    }
    defaults::apply_defaults(res, &mut obj);
    defaults::initial_status(res, &mut obj);
    for attempt in 0.. {
        if given_name && !generate.is_empty() {
            let suffix: String = (0..5)
                .map(|_| NAME_CHARS[rand::random_range(0..NAME_CHARS.len())] as char)
                .collect();
            obj["metadata"]["name"] = json!(format!("{generate}{suffix}"));
        }
        let name = meta_str(&obj, "name").to_string();
        let causes = defaults::validate(res, &obj);
        if !causes.is_empty() {
            return Err(ApiError::invalid(res.group, res.kind, &name, causes));
        }
        let taken = if res.plural == "services" {
            Some(state.alloc.prepare_service(&mut obj, None).await?)
        } else {
            None
        };
        match state
            .store
            .create(res.key(ns, &name).as_bytes(), encode(&obj))
            .await
        {
            Ok(kv) => {
                set_rv(&mut obj, kv.mod_revision);
                return Ok(obj);
            }
            Err(e) => {
                if let Some(t) = &taken {
                    state.alloc.release(t).await;
                }
                let retry = matches!(e, StoreError::AlreadyExists { .. })
                    && given_name
                    && !generate.is_empty()
                    && attempt < 5;
                if !retry {
                    return Err(ApiError::from_store(e, res.group, res.plural, &name));
                }
            }
        }
    }
    unreachable!("the loop returns")
}

fn check_type_meta(res: &Resource, obj: &mut Value) -> Result<(), ApiError> {
    let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
    if (!av.is_empty() && av != res.api_version()) || (!kind.is_empty() && kind != res.kind) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({}) or the kind ({kind}) is not {}",
            res.api_version(),
            res.kind
        )));
    }
    obj["apiVersion"] = json!(res.api_version());
    obj["kind"] = json!(res.kind);
    Ok(())
}

/// Which part of an object an update writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Everything but status (for resources with a status subresource).
    Main,
    /// Only status.
    Status,
}

/// Reads the object, lets `change` compute the new one, merges by `part`, and writes it
/// compare-and-swap. A stale `metadata.resourceVersion` in the new object gives 409; without one
/// the whole cycle is retried on a lost race. Returns the stored object.
pub async fn update<F>(
    state: &State,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    part: Part,
    mut change: F,
) -> Result<Value, ApiError>
where
    F: FnMut(&Value) -> Result<Value, ApiError>,
{
    for attempt in 0.. {
        let (old, rev) = get(state, res, ns, name).await?;
        let mut new = change(&old)?;
        if !new.is_object() {
            return Err(ApiError::bad_request(format!(
                "the body must be a {} object",
                res.kind
            )));
        }
        check_type_meta(res, &mut new)?;
        let pinned = parse_rv(&new)?;
        if let Some(p) = pinned
            && p != rev
        {
            return Err(ApiError::from_store(
                StoreError::Conflict {
                    key: String::new(),
                    expected: p,
                    actual: rev,
                },
                res.group,
                res.plural,
                name,
            ));
        }
        let body_name = meta_str(&new, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let new = merge_update(res, &old, new, part);
        match write_update(state, res, ns, name, &old, rev, new).await {
            // Retried even when `new` carries a resourceVersion: a patch merged onto `old`
            // carries old's, and a client's own pin is checked again at the top of the loop
            // (so a stale pin still answers Conflict, a patch without one never does).
            Err(e) if e.code == 409 && e.reason == "Conflict" && attempt < CAS_RETRIES => {
                continue;
            }
            other => return other,
        }
    }
    unreachable!("the loop returns")
}

/// The object an update stores: `new` with the server-owned fields of `old` kept.
fn merge_update(res: &Resource, old: &Value, mut new: Value, part: Part) -> Value {
    if part == Part::Status {
        let mut out = old.clone();
        out["status"] = new.get("status").cloned().unwrap_or(json!({}));
        return out;
    }
    if !new["metadata"].is_object() {
        new["metadata"] = json!({});
    }
    for f in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "namespace",
        "name",
        "generation",
    ] {
        match old["metadata"].get(f) {
            Some(v) => new["metadata"][f] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(f);
                }
            }
        }
    }
    if res.has_status() {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    defaults::apply_defaults(res, &mut new);
    if new.get("spec") != old.get("spec") {
        let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
        new["metadata"]["generation"] = json!(g + 1);
    }
    new
}

/// Writes `new` over `old` (read at `rev`): validation, service allocations, and the delete of an
/// object whose deletion waited only on the finalizers this write removes.
async fn write_update(
    state: &State,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    old: &Value,
    rev: i64,
    mut new: Value,
) -> Result<Value, ApiError> {
    let causes = defaults::validate(res, &new);
    if !causes.is_empty() {
        return Err(ApiError::invalid(res.group, res.kind, name, causes));
    }
    let key = res.key(ns, name);
    if new.pointer("/metadata/deletionTimestamp").is_some()
        && finalizers(&new).is_empty()
        && !is_graceful_pod(res, &new)
    {
        let deleted = state
            .store
            .delete(key.as_bytes(), Some(rev))
            .await
            .map_err(|e| ApiError::from_store(e, res.group, res.plural, name))?;
        if res.plural == "services" {
            state.alloc.release_unused(old, None).await;
        }
        state.gc_wake.notify_one();
        set_rv(&mut new, deleted.revision);
        return Ok(new);
    }
    let taken = if res.plural == "services" {
        Some(state.alloc.prepare_service(&mut new, Some(old)).await?)
    } else {
        None
    };
    match state.store.update(key.as_bytes(), encode(&new), rev).await {
        Ok(kv) => {
            if res.plural == "services" {
                state.alloc.release_unused(old, Some(&new)).await;
            }
            set_rv(&mut new, kv.mod_revision);
            Ok(new)
        }
        Err(e) => {
            if let Some(t) = &taken {
                state.alloc.release(t).await;
            }
            Err(ApiError::from_store(e, res.group, res.plural, name))
        }
    }
}

/// A pod still inside its termination grace period, waiting for its node.
fn is_graceful_pod(res: &Resource, obj: &Value) -> bool {
    res.plural == "pods"
        && obj
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            > 0
}

/// How a delete proceeds.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    pub grace_period: Option<i64>,
    /// `Foreground`, `Background` or `Orphan`.
    pub propagation: Option<String>,
    pub precondition_uid: Option<String>,
    pub precondition_rv: Option<String>,
}

/// Deletes (or starts deleting) an object. Returns the object as last stored, and whether it is
/// gone (false: it waits for finalizers or a pod's grace period).
pub async fn delete(
    state: &State,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    opts: &DeleteOptions,
) -> Result<(Value, bool), ApiError> {
    for attempt in 0.. {
        let (old, rev) = get(state, res, ns, name).await?;
        if let Some(uid) = &opts.precondition_uid
            && uid != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                res.group,
                res.plural,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid")
                ),
            ));
        }
        if let Some(p) = &opts.precondition_rv
            && *p != rev.to_string()
        {
            return Err(ApiError::conflict(
                res.group,
                res.plural,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {p}, ResourceVersion in object meta: {rev}"
                ),
            ));
        }
        let mut fins = finalizers(&old);
        match opts.propagation.as_deref() {
            Some("Foreground") => add(&mut fins, "foregroundDeletion"),
            Some("Orphan") => add(&mut fins, "orphan"),
            Some("Background") | None => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "unsupported propagationPolicy {other:?}: expected Foreground, Background or Orphan"
                )));
            }
        }
        let deleting = old.pointer("/metadata/deletionTimestamp").is_some();
        let mut new = old.clone();
        let result = if res.plural == "namespaces" {
            if let Ok(mut c) = state.active_namespaces.lock() {
                c.remove(name);
            }
            if deleting {
                return Ok((old, false));
            }
            new["metadata"]["deletionTimestamp"] = json!(now());
            new["status"]["phase"] = json!("Terminating");
            store_update(state, res, ns, name, rev, new)
                .await
                .map(|v| (v, false))
        } else if let Some(grace) = pod_grace(res, &old, opts) {
            if deleting
                && old["metadata"]["deletionGracePeriodSeconds"]
                    .as_i64()
                    .is_some_and(|g| g <= grace)
                && fins == finalizers(&old)
            {
                return Ok((old, false));
            }
            new["metadata"]["deletionTimestamp"] = json!(later(grace));
            new["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            set_finalizers(&mut new, &fins);
            store_update(state, res, ns, name, rev, new)
                .await
                .map(|v| (v, false))
        } else if !fins.is_empty() {
            if deleting && fins == finalizers(&old) {
                return Ok((old, false));
            }
            if !deleting {
                new["metadata"]["deletionTimestamp"] = json!(now());
                new["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            }
            set_finalizers(&mut new, &fins);
            store_update(state, res, ns, name, rev, new)
                .await
                .map(|v| (v, false))
        } else {
            match state
                .store
                .delete(res.key(ns, name).as_bytes(), Some(rev))
                .await
            {
                Ok(d) => {
                    if res.plural == "services" {
                        state.alloc.release_unused(&old, None).await;
                    }
                    let mut last = old.clone();
                    set_rv(&mut last, d.revision);
                    Ok((last, true))
                }
                Err(e) => Err(ApiError::from_store(e, res.group, res.plural, name)),
            }
        };
        match result {
            Err(e) if e.code == 409 && e.reason == "Conflict" && attempt < CAS_RETRIES => continue,
            Err(e) => return Err(e),
            Ok(r) => {
                state.gc_wake.notify_one();
                return Ok(r);
            }
        }
    }
    unreachable!("the loop returns")
}

fn add(fins: &mut Vec<String>, f: &str) {
    if !fins.iter().any(|x| x == f) {
        fins.push(f.to_string());
    }
}

/// The grace period a pod delete waits, or None when the pod goes at once: not bound to a node,
/// already finished, or a grace period of 0 was asked for.
fn pod_grace(res: &Resource, pod: &Value, opts: &DeleteOptions) -> Option<i64> {
    if res.plural != "pods" {
        return None;
    }
    let bound = !pod["spec"]["nodeName"].as_str().unwrap_or("").is_empty();
    let finished = matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    );
    let grace = opts
        .grace_period
        .or_else(|| pod["spec"]["terminationGracePeriodSeconds"].as_i64())
        .unwrap_or(30);
    (bound && !finished && grace > 0).then_some(grace)
}

async fn store_update(
    state: &State,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    rev: i64,
    mut new: Value,
) -> Result<Value, ApiError> {
    let kv = state
        .store
        .update(res.key(ns, name).as_bytes(), encode(&new), rev)
        .await
        .map_err(|e| ApiError::from_store(e, res.group, res.plural, name))?;
    set_rv(&mut new, kv.mod_revision);
    Ok(new)
}

/// Creates `default`, `kube-system`, `kube-public`, `kube-node-lease` and the `kubernetes`
/// Service when missing.
pub async fn bootstrap(state: &State, api_port: u16) -> Result<(), ApiError> {
    let nsr = resources::lookup("", "v1", "namespaces").expect("namespaces is served");
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        match create(state, nsr, None, json!({"metadata": {"name": ns}})).await {
            Ok(_) => {}
            Err(e) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    let svc = resources::lookup("", "v1", "services").expect("services is served");
    let ip = state.alloc.cidr.first().to_string();
    let obj = json!({
        "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"clusterIP": ip, "ports": [{"name": "https", "port": 443, "targetPort": api_port}]}
    });
    match create(state, svc, Some("default"), obj).await {
        Ok(_) => Ok(()),
        Err(e) if e.code == 409 || (e.code == 422 && e.message.contains("already allocated")) => {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_v4() {
        let u = uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, uuid());
    }

    #[test]
    fn continue_tokens_round_trip() {
        let t = encode_continue(42, b"/registry/core/pods/default/b");
        assert_eq!(
            decode_continue(&t).unwrap(),
            (42, b"/registry/core/pods/default/b".to_vec())
        );
        assert_eq!(decode_continue("!!").unwrap_err().code, 400);
    }

    #[test]
    fn updates_keep_server_fields_and_bump_generation() {
        let d = resources::lookup("apps", "v1", "deployments").unwrap();
        let old = json!({"metadata": {"name": "a", "uid": "u", "generation": 1, "creationTimestamp": "t"},
                         "spec": {"replicas": 1}, "status": {"replicas": 1}});
        let new = json!({"metadata": {"name": "a", "uid": "forged"}, "spec": {"replicas": 2}, "status": {}});
        let out = merge_update(d, &old, new, Part::Main);
        assert_eq!(out["metadata"]["uid"], "u");
        assert_eq!(out["metadata"]["generation"], 2);
        assert_eq!(out["status"], json!({"replicas": 1}));
        let out = merge_update(
            d,
            &old,
            json!({"spec": {"replicas": 9}, "status": {"replicas": 3}}),
            Part::Status,
        );
        assert_eq!(out["spec"]["replicas"], 1);
        assert_eq!(out["status"]["replicas"], 3);
    }
}
