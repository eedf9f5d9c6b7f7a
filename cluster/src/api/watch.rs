//! The watch verb: a chunked stream of `{"type": ..., "object": ...}` lines.
//!
//! Without a resourceVersion (or with "0") the watch first sends the current matching objects as
//! ADDED, then follows the store from the revision of that read; with one it follows from that
//! revision. Selectors are applied to both sides of each change, so an object that stops
//! matching arrives as DELETED and one that starts matching as ADDED, as kube-apiserver does.
//! Store progress notifications become BOOKMARK events when the client allows them; a compacted
//! start revision becomes an ERROR event carrying a 410 Expired Status. Must not write.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};

use super::objects::{self, ListQuery, State, decode, set_rv};
use super::resources::Resource;
use super::selectors::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::table::{self, Include};
use crate::store::{StoreError, WatchEvent, WatchOptions};

/// What a watch request asked for.
pub struct WatchRequest {
    pub res: &'static Resource,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    /// The `resourceVersion` parameter.
    pub resource_version: Option<String>,
    pub bookmarks: bool,
    pub send_initial_events: bool,
    pub timeout: Option<Duration>,
    /// Table output, and what its rows include.
    pub table: Option<Include>,
}

fn line(event_type: &str, object: Value) -> Bytes {
    let mut b =
        serde_json::to_vec(&json!({"type": event_type, "object": object})).unwrap_or_default();
    b.push(b'\n');
    Bytes::from(b)
}

/// Starts the watch and returns the streaming response.
pub async fn watch(state: Arc<State>, req: WatchRequest) -> Result<Response, ApiError> {
    let res = req.res;
    let ns = req.namespace.as_deref();
    let mut initial = Vec::new();
    let from = match req.resource_version.as_deref() {
        None | Some("") | Some("0") => {
            let page = objects::list(
                &state,
                res,
                ns,
                &ListQuery {
                    labels: req.labels.clone(),
                    fields: req.fields.clone(),
                    ..Default::default()
                },
            )
            .await?;
            initial = page.items;
            page.revision
        }
        Some(rv) => rv.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!(
                "resourceVersion {rv:?} is not a valid resource version"
            ))
        })?,
    };
    let prefix = res.list_prefix(ns);
    let opts = WatchOptions {
        progress_interval: Some(state.bookmark_interval),
    };
    let stream = match state.store.watch(prefix.as_bytes(), from, opts).await {
        Ok(s) => s,
        Err(StoreError::Compacted { requested, .. }) => {
            let err = ApiError::gone(format!("too old resource version: {requested}"));
            let body = line("ERROR", err.to_status());
            return Ok(respond(Body::from(body)));
        }
        Err(e) => return Err(e.into()),
    };

    let render = {
        let table_mode = req.table;
        move |obj: Value| -> Value {
            match table_mode {
                Some(include) => {
                    let rv = obj["metadata"]["resourceVersion"]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    table::table(res, std::slice::from_ref(&obj), include, rv, None)
                }
                None => obj,
            }
        }
    };

    let mut head: Vec<Bytes> = initial
        .into_iter()
        .map(|o| line("ADDED", render(o)))
        .collect();
    if req.send_initial_events {
        head.push(line(
            "BOOKMARK",
            json!({"kind": res.kind, "apiVersion": res.api_version(),
                   "metadata": {"resourceVersion": from.to_string(),
                                "annotations": {"k8s.io/initial-events-end": "true"}}}),
        ));
    }

    let labels = req.labels;
    let fields = req.fields;
    let bookmarks = req.bookmarks;
    let matches = move |o: &Value| labels.matches(o) && fields.matches(o);
    let events = stream
        .scan(false, move |ended, item| {
            let out = if *ended {
                None
            } else {
                match item {
                    Ok(ev) => Some(convert(res, ev, &matches, bookmarks, &render)),
                    Err(e) => {
                        *ended = true;
                        let err = match e {
                            StoreError::Compacted { requested, .. } => {
                                ApiError::gone(format!("too old resource version: {requested}"))
                            }
                            other => ApiError::internal(format!("watch: {other}")),
                        };
                        Some(Some(line("ERROR", err.to_status())))
                    }
                }
            };
            futures::future::ready(out)
        })
        .filter_map(futures::future::ready);
    let body_stream = futures::stream::iter(head)
        .chain(events)
        .map(Ok::<Bytes, Infallible>);
    let body = match req.timeout {
        Some(t) => Body::from_stream(body_stream.take_until(tokio::time::sleep(t))),
        None => Body::from_stream(body_stream),
    };
    Ok(respond(body))
}

fn convert(
    res: &Resource,
    ev: WatchEvent,
    matches: &impl Fn(&Value) -> bool,
    bookmarks: bool,
    render: &impl Fn(Value) -> Value,
) -> Option<Bytes> {
    match ev {
        WatchEvent::Put { kv, prev } => {
            let obj = decode(&kv).ok()?;
            let now = matches(&obj);
            let before = prev
                .as_ref()
                .and_then(|p| decode(p).ok())
                .map(|p| matches(&p));
            let ty = match (before, now) {
                (Some(true), true) => "MODIFIED",
                (None | Some(false), true) => "ADDED",
                (Some(true), false) => "DELETED",
                (_, false) => return None,
            };
            Some(line(ty, render(obj)))
        }
        WatchEvent::Delete { last, revision } => {
            let mut obj = decode(&last).ok()?;
            set_rv(&mut obj, revision);
            matches(&obj).then(|| line("DELETED", render(obj)))
        }
        WatchEvent::Progress { revision } => bookmarks.then(|| {
            line(
                "BOOKMARK",
                json!({"kind": res.kind, "apiVersion": res.api_version(),
                       "metadata": {"resourceVersion": revision.to_string()}}),
            )
        }),
    }
}

fn respond(body: Body) -> Response {
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    r
}
