//! The garbage collector: finishes deletions that wait on the server itself.
//!
//! - Objects whose every owner (ownerReferences, by uid, of a kind this server serves) is gone
//!   are deleted (background propagation).
//! - An owner deleted with `propagationPolicy=Foreground` carries the `foregroundDeletion`
//!   finalizer: its dependents are deleted (foreground too), and the finalizer is removed once
//!   none is left, which deletes the owner.
//! - An owner deleted with `Orphan` carries the `orphan` finalizer: the ownerReferences to it are
//!   removed from its dependents, then the finalizer.
//! - A terminating namespace has its contents deleted, then goes itself.
//! - A pod past its termination grace period whose node does not exist (nothing will finish it)
//!   is deleted.
//!
//! Each pass reads every object at one store revision, so it sees a consistent graph. Passes run
//! after deletes (woken by the handlers) and periodically. All writes go through `objects.rs`,
//! compare-and-swap; a lost race is settled by the next pass.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::objects::{self, DeleteOptions, ListQuery, Part, State, meta_str};
use super::resources::{self, RESOURCES, Resource};
use super::status::ApiError;

/// Runs passes until the task is aborted.
pub async fn run(state: Arc<State>, interval: Duration) {
    loop {
        tokio::select! {
            _ = state.gc_wake.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
        // Let a burst of deletes settle into one pass.
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A pass that changed something may have unblocked more work (dependents of dependents).
        for _ in 0..16 {
            match pass(&state).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "garbage collection pass failed");
                    break;
                }
            }
        }
    }
}

struct Obj {
    res: &'static Resource,
    obj: Value,
}

impl Obj {
    fn ns(&self) -> Option<&str> {
        let ns = meta_str(&self.obj, "namespace");
        (!ns.is_empty()).then_some(ns)
    }
    fn name(&self) -> &str {
        meta_str(&self.obj, "name")
    }
    fn uid(&self) -> &str {
        meta_str(&self.obj, "uid")
    }
    fn deleting(&self) -> bool {
        self.obj.pointer("/metadata/deletionTimestamp").is_some()
    }
    fn has_finalizer(&self, f: &str) -> bool {
        self.obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x == f))
    }
    fn owners(&self) -> Vec<&Value> {
        self.obj
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    }
}

/// One pass; returns how many writes it made.
pub async fn pass(state: &State) -> Result<usize, ApiError> {
    let rev = state.store.revision().await?;
    let mut all = Vec::new();
    for res in RESOURCES {
        let page = objects::list(
            state,
            res,
            None,
            &ListQuery {
                at: Some(rev),
                ..Default::default()
            },
        )
        .await?;
        all.extend(page.items.into_iter().map(|obj| Obj { res, obj }));
    }
    let uids: HashSet<&str> = all.iter().map(Obj::uid).collect();
    let mut dependents: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, o) in all.iter().enumerate() {
        for r in o.owners() {
            if let Some(uid) = r["uid"].as_str() {
                dependents.entry(uid).or_default().push(i);
            }
        }
    }
    let terminating: HashSet<&str> = all
        .iter()
        .filter(|o| o.res.plural == "namespaces" && o.deleting())
        .map(Obj::name)
        .collect();
    let nodes: HashSet<&str> = all
        .iter()
        .filter(|o| o.res.plural == "nodes")
        .map(Obj::name)
        .collect();
    let mut writes = 0;
    let background = DeleteOptions {
        propagation: Some("Background".into()),
        ..Default::default()
    };
    let foreground = DeleteOptions {
        propagation: Some("Foreground".into()),
        ..Default::default()
    };

    for o in &all {
        let outcome = async {
            if o.res.namespaced
                && o.ns().is_some_and(|ns| terminating.contains(ns))
                && !o.deleting()
            {
                objects::delete(state, o.res, o.ns(), o.name(), &background).await?;
                return Ok(true);
            }
            if o.deleting() {
                let deps = dependents.get(o.uid()).cloned().unwrap_or_default();
                if o.has_finalizer("foregroundDeletion") {
                    let live: Vec<&Obj> = deps.iter().map(|&i| &all[i]).collect();
                    if live.is_empty() {
                        remove_finalizer(state, o, "foregroundDeletion").await?;
                        return Ok(true);
                    }
                    let mut wrote = false;
                    for d in live.into_iter().filter(|d| !d.deleting()) {
                        objects::delete(state, d.res, d.ns(), d.name(), &foreground).await?;
                        wrote = true;
                    }
                    return Ok(wrote);
                }
                if o.has_finalizer("orphan") {
                    let uid = o.uid().to_string();
                    for &i in &deps {
                        let d = &all[i];
                        objects::update(state, d.res, d.ns(), d.name(), Part::Main, |old| {
                            let mut new = old.clone();
                            if let Some(refs) = new
                                .pointer_mut("/metadata/ownerReferences")
                                .and_then(Value::as_array_mut)
                            {
                                refs.retain(|r| r["uid"] != uid.as_str());
                            }
                            if new["metadata"]["ownerReferences"] == json!([]) {
                                new["metadata"]
                                    .as_object_mut()
                                    .map(|m| m.remove("ownerReferences"));
                            }
                            Ok(new)
                        })
                        .await?;
                    }
                    remove_finalizer(state, o, "orphan").await?;
                    return Ok(true);
                }
                if o.res.plural == "pods" && grace_expired(&o.obj) {
                    let node = o.obj["spec"]["nodeName"].as_str().unwrap_or("");
                    if !nodes.contains(node) {
                        let force = DeleteOptions {
                            grace_period: Some(0),
                            ..Default::default()
                        };
                        objects::delete(state, o.res, o.ns(), o.name(), &force).await?;
                        return Ok(true);
                    }
                }
                if o.res.plural == "namespaces" {
                    let empty = !all
                        .iter()
                        .any(|x| x.res.namespaced && x.ns() == Some(o.name()));
                    if empty {
                        state
                            .store
                            .delete(o.res.key(None, o.name()).as_bytes(), None)
                            .await?;
                        return Ok(true);
                    }
                }
                return Ok(false);
            }
            let owners = o.owners();
            if !owners.is_empty() {
                let served_owners: Vec<&&Value> = owners
                    .iter()
                    .filter(|r| {
                        resources::by_kind(
                            r["apiVersion"].as_str().unwrap_or(""),
                            r["kind"].as_str().unwrap_or(""),
                        )
                        .is_some()
                    })
                    .collect();
                let all_gone = served_owners.len() == owners.len()
                    && owners
                        .iter()
                        .all(|r| !uids.contains(r["uid"].as_str().unwrap_or("")));
                if all_gone {
                    objects::delete(state, o.res, o.ns(), o.name(), &background).await?;
                    return Ok(true);
                }
            }
            Ok::<bool, ApiError>(false)
        }
        .await;
        match outcome {
            Ok(true) => writes += 1,
            Ok(false) => {}
            // Changed or gone since the read: the next pass sees the new state.
            Err(e) if matches!(e.code, 404 | 409) => writes += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(writes)
}

async fn remove_finalizer(state: &State, o: &Obj, f: &str) -> Result<(), ApiError> {
    objects::update(state, o.res, o.ns(), o.name(), Part::Main, |old| {
        let mut new = old.clone();
        if let Some(fins) = new
            .pointer_mut("/metadata/finalizers")
            .and_then(Value::as_array_mut)
        {
            fins.retain(|x| x != f);
        }
        if new["metadata"]["finalizers"] == json!([]) {
            new["metadata"]
                .as_object_mut()
                .map(|m| m.remove("finalizers"));
        }
        Ok(new)
    })
    .await
    .map(|_| ())
}

fn grace_expired(pod: &Value) -> bool {
    pod.pointer("/metadata/deletionTimestamp")
        .and_then(Value::as_str)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .is_some_and(|t| t.with_timezone(&Utc) <= Utc::now())
}
