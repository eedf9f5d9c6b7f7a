//! HTTP requests to API operations: the path parsed into a resource request (as kube-apiserver's
//! RequestInfo resolver does), the verb chosen from method and parameters, node authorization,
//! content negotiation (JSON objects, or Tables for kubectl), and the answers.
//!
//! Owns the wire shape of each verb; the object semantics live in `objects.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::auth::{Identity, WriteRequest, authorize_write};
use super::discovery;
use super::node_proxy;
use super::objects::{self, DeleteOptions, ListQuery, Part, State, meta_str};
use super::patch::{self, PatchType};
use super::protobuf;
use super::resources::{self, Resource};
use super::selectors::{FieldSelector, LabelSelector};
use super::status::{self, ApiError};
use super::table::{self, Include};
use super::watch::{self, WatchRequest};

/// A request for a resource.
#[derive(Debug)]
struct ResourceRequest {
    res: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

/// What a path names.
#[derive(Debug)]
enum Route {
    Version,
    Health,
    OpenApiV2,
    CoreVersions,
    Groups,
    Group(String),
    ResourceList(String, String),
    Resource(ResourceRequest),
}

fn route(path: &str) -> Result<Route, ApiError> {
    let parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let nf = || ApiError::no_route(path);
    match parts.as_slice() {
        ["version"] => Ok(Route::Version),
        ["healthz" | "readyz" | "livez", ..] => Ok(Route::Health),
        ["openapi", "v2"] | ["swagger.json"] => Ok(Route::OpenApiV2),
        ["api"] => Ok(Route::CoreVersions),
        ["apis"] => Ok(Route::Groups),
        ["apis", g] => Ok(Route::Group(g.to_string())),
        ["api", v] => Ok(Route::ResourceList(String::new(), v.to_string())),
        ["apis", g, v] => Ok(Route::ResourceList(g.to_string(), v.to_string())),
        ["api", v, rest @ ..] => resource_route("", v, rest)
            .ok_or_else(nf)
            .map(Route::Resource),
        ["apis", g, v, rest @ ..] => resource_route(g, v, rest)
            .ok_or_else(nf)
            .map(Route::Resource),
        _ => Err(nf()),
    }
}

fn resource_route(group: &str, version: &str, rest: &[&str]) -> Option<ResourceRequest> {
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..]
            if !tail.is_empty() && !matches!(tail[0], "status" | "finalize") =>
        {
            (Some(ns.to_string()), tail)
        }
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(n.to_string()), None),
        [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
        _ => return None,
    };
    let res = resources::lookup(group, version, plural)?;
    if res.namespaced != namespace.is_some() && !(res.namespaced && name.is_none()) {
        // A namespaced object needs its namespace; a cluster-scoped one must not have one.
        return None;
    }
    if let Some(s) = &sub
        && !res.has_subresource(s)
    {
        return None;
    }
    Some(ResourceRequest {
        res,
        namespace,
        name,
        subresource: sub,
    })
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = (code, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves one authenticated request.
pub async fn handle(
    state: Arc<State>,
    who: Identity,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match serve(state, &who, &method, &uri, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn serve(
    state: Arc<State>,
    who: &Identity,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let path = uri.path();
    let r = route(path)?;
    let get_only = |r: Result<Response, ApiError>| {
        if method == Method::GET {
            r
        } else {
            Err(ApiError::method_not_allowed(format!(
                "{method} is not allowed on {path}"
            )))
        }
    };
    match r {
        Route::Version => get_only(Ok(json_response(StatusCode::OK, &discovery::version()))),
        Route::Health => {
            state
                .store
                .revision()
                .await
                .map_err(|e| ApiError::unavailable(format!("store: {e}")))?;
            Ok((StatusCode::OK, "ok").into_response())
        }
        Route::OpenApiV2 => {
            let accept = header_str(headers, header::ACCEPT);
            if accept.contains("protobuf") && !accept.contains("application/json") {
                // The empty protobuf message is the empty openapi_v2.Document.
                let mut r = (StatusCode::OK, Vec::<u8>::new()).into_response();
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                    ),
                );
                Ok(r)
            } else {
                Ok(json_response(StatusCode::OK, &discovery::openapi_v2_json()))
            }
        }
        Route::CoreVersions => get_only(Ok(json_response(
            StatusCode::OK,
            &discovery::core_versions(&host(headers)),
        ))),
        Route::Groups => get_only(Ok(json_response(StatusCode::OK, &discovery::group_list()))),
        Route::Group(g) => discovery::api_group(&g)
            .map(|v| json_response(StatusCode::OK, &v))
            .ok_or_else(|| ApiError::no_route(path)),
        Route::ResourceList(g, v) => discovery::resource_list(&g, &v)
            .map(|v| json_response(StatusCode::OK, &v))
            .ok_or_else(|| ApiError::no_route(path)),
        Route::Resource(req) => resource(state, who, method, uri, headers, body, req).await,
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

fn host(headers: &HeaderMap) -> String {
    header_str(headers, header::HOST)
}

fn query(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (decode_component(k), decode_component(v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn decode_component(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_body(res: &Resource, body: &Bytes, headers: &HeaderMap) -> Result<Value, ApiError> {
    let ct = header_str(headers, header::CONTENT_TYPE);
    let base = ct.split(';').next().unwrap_or("").trim();
    match base {
        "" | "application/json" | "*/*" => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}"))),
        "application/vnd.kubernetes.protobuf" => {
            let mut obj = protobuf::decode(res.kind, body)?;
            obj["apiVersion"] = json!(res.api_version());
            obj["kind"] = json!(res.kind);
            Ok(obj)
        }
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

/// The stored pod's node, for node authorization.
async fn bound_node(state: &State, req: &ResourceRequest) -> Option<String> {
    if req.res.plural != "pods" {
        return None;
    }
    let name = req.name.as_deref()?;
    let (pod, _) = objects::get(state, req.res, req.namespace.as_deref(), name)
        .await
        .ok()?;
    pod["spec"]["nodeName"].as_str().map(str::to_string)
}

async fn resource(
    state: Arc<State>,
    who: &Identity,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    req: ResourceRequest,
) -> Result<Response, ApiError> {
    let q = query(uri);
    let res = req.res;
    let ns = req.namespace.as_deref();
    let accept = header_str(headers, header::ACCEPT);
    let table_mode = table::wants_table(&accept)
        .then(|| Include::parse(q.get("includeObject").map(String::as_str)));
    let verb = match (method.as_str(), req.name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) => {
            "watch"
        }
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", true) => "update",
        ("PATCH", true) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => {
            return Err(ApiError::method_not_allowed(format!(
                "{method} is not supported on {}",
                uri.path()
            )));
        }
    };
    if !matches!(verb, "get" | "list" | "watch") && *who != Identity::Admin {
        let bound = bound_node(&state, &req).await;
        // A create names its object in the body (a node creating its own Node or Lease).
        let body_name = (verb == "create" && req.name.is_none())
            .then(|| parse_body(res, &body, headers).ok())
            .flatten()
            .and_then(|v| v["metadata"]["name"].as_str().map(str::to_string));
        authorize_write(
            who,
            &WriteRequest {
                resource: res.plural,
                subresource: req.subresource.as_deref(),
                namespace: ns,
                name: req.name.as_deref().or(body_name.as_deref()),
                verb,
                bound_node: bound.as_deref(),
            },
        )?;
    }
    let name = req.name.clone().unwrap_or_default();
    let sub = req.subresource.as_deref();
    match verb {
        "get" if sub == Some("log") => {
            node_proxy::pod_log(&state, res, ns.unwrap_or_default(), &name, &q).await
        }
        "get" => {
            let (obj, rev) = objects::get(&state, res, ns, &name).await?;
            let out = match sub {
                Some("scale") => to_scale(res, &obj),
                _ => match table_mode {
                    Some(include) => table::table(res, &[obj], include, rev, None),
                    None => obj,
                },
            };
            Ok(json_response(StatusCode::OK, &out))
        }
        "list" => {
            let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?;
            let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))?;
            let limit = q
                .get("limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(0usize);
            let cont = q
                .get("continue")
                .filter(|c| !c.is_empty())
                .map(String::as_str);
            let at = match (
                q.get("resourceVersionMatch").map(String::as_str),
                q.get("resourceVersion"),
            ) {
                (Some("Exact"), Some(rv)) => Some(rv.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("resourceVersion {rv:?} is not valid"))
                })?),
                _ => None,
            };
            let page = objects::list(
                &state,
                res,
                ns,
                &ListQuery {
                    labels,
                    fields,
                    limit,
                    cont,
                    at,
                },
            )
            .await?;
            let out = match table_mode {
                Some(include) => table::table(
                    res,
                    &page.items,
                    include,
                    page.revision,
                    page.cont.as_deref(),
                ),
                None => {
                    let mut meta = json!({"resourceVersion": page.revision.to_string()});
                    if let Some(c) = &page.cont {
                        meta["continue"] = json!(c);
                    }
                    json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(), "metadata": meta, "items": page.items})
                }
            };
            Ok(json_response(StatusCode::OK, &out))
        }
        "watch" => {
            let wr = WatchRequest {
                res,
                namespace: req.namespace.clone(),
                labels: LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?,
                fields: FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))?,
                resource_version: q.get("resourceVersion").cloned(),
                bookmarks: q.get("allowWatchBookmarks").is_some_and(|v| v == "true"),
                send_initial_events: q.get("sendInitialEvents").is_some_and(|v| v == "true"),
                timeout: q
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse().ok())
                    .map(Duration::from_secs),
                table: table_mode,
            };
            watch::watch(state.clone(), wr).await
        }
        "create" => {
            let obj = parse_body(res, &body, headers)?;
            match sub {
                Some("binding") => bind(&state, res, ns, &name, &obj).await,
                Some(_) => Err(ApiError::method_not_allowed(
                    "POST is not supported on this subresource",
                )),
                None => {
                    if req.name.is_some() {
                        return Err(ApiError::method_not_allowed(
                            "POST must target the collection",
                        ));
                    }
                    let created = objects::create(&state, res, ns, obj).await?;
                    Ok(json_response(StatusCode::CREATED, &created))
                }
            }
        }
        "update" | "patch" => {
            let change: Change = if verb == "update" {
                let obj = parse_body(res, &body, headers)?;
                Box::new(move |_old: &Value| Ok(obj.clone()))
            } else {
                let ty = PatchType::from_content_type(&header_str(headers, header::CONTENT_TYPE))?;
                let body = body.clone();
                Box::new(move |old: &Value| {
                    let mut target = old.clone();
                    patch::apply(&mut target, ty, &body)?;
                    Ok(target)
                })
            };
            let out = match sub {
                Some("scale") => {
                    let mut change = change;
                    let updated = objects::update(&state, res, ns, &name, Part::Main, |old| {
                        let scale = change(&to_scale(res, old))?;
                        let replicas = scale
                            .pointer("/spec/replicas")
                            .and_then(Value::as_i64)
                            .unwrap_or(0);
                        let mut new = old.clone();
                        new["spec"]["replicas"] = json!(replicas);
                        if let Some(rv) = scale.pointer("/metadata/resourceVersion") {
                            new["metadata"]["resourceVersion"] = rv.clone();
                        }
                        Ok(new)
                    })
                    .await?;
                    to_scale(res, &updated)
                }
                Some("status") => {
                    objects::update(&state, res, ns, &name, Part::Status, change).await?
                }
                Some(_) => {
                    return Err(ApiError::method_not_allowed(
                        "this subresource cannot be updated",
                    ));
                }
                None => objects::update(&state, res, ns, &name, Part::Main, change).await?,
            };
            Ok(json_response(StatusCode::OK, &out))
        }
        "delete" => {
            let opts = delete_options(&q, &body)?;
            let (obj, gone) = objects::delete(&state, res, ns, &name, &opts).await?;
            let code = if gone {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            Ok(json_response(code, &obj))
        }
        "deletecollection" => {
            let opts = delete_options(&q, &body)?;
            let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?;
            let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))?;
            let page = objects::list(
                &state,
                res,
                ns,
                &ListQuery {
                    labels,
                    fields,
                    ..Default::default()
                },
            )
            .await?;
            let mut items = Vec::new();
            for o in page.items {
                let n = meta_str(&o, "name").to_string();
                let ons = meta_str(&o, "namespace").to_string();
                let ons = (!ons.is_empty()).then_some(ons);
                match objects::delete(&state, res, ons.as_deref(), &n, &opts).await {
                    Ok((obj, _)) => items.push(obj),
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(), "metadata": {}, "items": items}),
            ))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{verb} is not supported"
        ))),
    }
}

/// Computes an object's new state from its current one (PUT body, or a patch applied).
type Change = Box<dyn FnMut(&Value) -> Result<Value, ApiError> + Send>;

fn delete_options(q: &HashMap<String, String>, body: &Bytes) -> Result<DeleteOptions, ApiError> {
    let b: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("DeleteOptions is not valid JSON: {e}")))?
    };
    let grace = q
        .get("gracePeriodSeconds")
        .and_then(|g| g.parse().ok())
        .or_else(|| b["gracePeriodSeconds"].as_i64());
    let propagation = q
        .get("propagationPolicy")
        .cloned()
        .or_else(|| b["propagationPolicy"].as_str().map(str::to_string))
        .or_else(|| {
            match b["orphanDependents"]
                .as_bool()
                .or_else(|| q.get("orphanDependents").map(|o| o == "true"))
            {
                Some(true) => Some("Orphan".into()),
                Some(false) => Some("Background".into()),
                None => None,
            }
        });
    Ok(DeleteOptions {
        grace_period: grace,
        propagation,
        precondition_uid: b["preconditions"]["uid"].as_str().map(str::to_string),
        precondition_rv: b["preconditions"]["resourceVersion"]
            .as_str()
            .map(str::to_string),
    })
}

/// The autoscaling/v1 Scale of a Deployment or ReplicaSet.
fn to_scale(_res: &Resource, obj: &Value) -> Value {
    let m = &obj["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {"name": m["name"], "namespace": m["namespace"], "uid": m["uid"],
                     "resourceVersion": m["resourceVersion"], "creationTimestamp": m["creationTimestamp"]},
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(0)},
        "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0),
                   "selector": LabelSelector::from_object(&obj["spec"]["selector"]).to_query()},
    })
}

/// `POST pods/<name>/binding`: sets spec.nodeName once.
async fn bind(
    state: &State,
    res: &Resource,
    ns: Option<&str>,
    name: &str,
    binding: &Value,
) -> Result<Response, ApiError> {
    let node = binding["target"]["name"].as_str().unwrap_or("").to_string();
    if node.is_empty() {
        return Err(ApiError::invalid(
            "",
            "Binding",
            name,
            vec![status::Cause::new("target.name", "Required value")],
        ));
    }
    objects::update(state, res, ns, name, Part::Main, |old| {
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            return Err(ApiError::conflict(
                "",
                "pods",
                name,
                "pod is being deleted, cannot be assigned to a host",
            ));
        }
        let current = old["spec"]["nodeName"].as_str().unwrap_or("");
        if !current.is_empty() {
            return Err(ApiError::conflict(
                "",
                "pods",
                name,
                &format!("pod {name} is already assigned to node {current:?}"),
            ));
        }
        let mut new = old.clone();
        new["spec"]["nodeName"] = json!(node);
        Ok(new)
    })
    .await?;
    Ok(json_response(StatusCode::CREATED, &status::success(201)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res_route(path: &str) -> ResourceRequest {
        match route(path).unwrap() {
            Route::Resource(r) => r,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn paths_resolve_like_kube_apiserver() {
        let r = res_route("/api/v1/namespaces/default/pods/p1/status");
        assert_eq!(
            (
                r.res.plural,
                r.namespace.as_deref(),
                r.name.as_deref(),
                r.subresource.as_deref()
            ),
            ("pods", Some("default"), Some("p1"), Some("status"))
        );
        let r = res_route("/api/v1/pods");
        assert_eq!((r.res.plural, r.namespace, r.name), ("pods", None, None));
        let r = res_route("/api/v1/namespaces/kube-system");
        assert_eq!(
            (r.res.plural, r.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );
        let r = res_route("/api/v1/namespaces/x/status");
        assert_eq!(
            (r.res.plural, r.name.as_deref(), r.subresource.as_deref()),
            ("namespaces", Some("x"), Some("status"))
        );
        let r = res_route("/apis/apps/v1/namespaces/d/deployments/web/scale");
        assert_eq!(r.subresource.as_deref(), Some("scale"));
        assert!(
            matches!(route("/apis/apps/v1").unwrap(), Route::ResourceList(g, v) if g == "apps" && v == "v1")
        );
        assert!(route("/api/v1/namespaces/d/widgets").is_err());
        assert!(route("/api/v1/namespaces/d/pods/p/bogus").is_err());
        assert!(route("/api/v1/nodes/n1/binding").is_err());
        assert!(route("/api/v1/namespaces/d/pods/p").is_ok());
        assert!(route("/api/v1/pods/p").is_err());
    }

    #[test]
    fn query_strings_decode() {
        let q = query(
            &"/x?labelSelector=app%3Dweb%2Ctier+in+(a)&watch=1&e="
                .parse()
                .unwrap(),
        );
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["watch"], "1");
        assert_eq!(q["e"], "");
        assert_eq!(decode_component("100%"), "100%");
    }
}
