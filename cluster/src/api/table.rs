//! kubectl's server-side printing: `meta.k8s.io/v1` Table answers (`Accept:
//! application/json;as=Table;g=meta.k8s.io;v=v1`) with the columns kube-apiserver prints for the
//! main resources; columns with priority 1 show only with `-o wide`. Pure functions on JSON.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::resources::Resource;

/// What a row's `object` holds (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Include {
        match s {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

/// Whether an Accept header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.contains("as=Table"))
}

/// A Table of `objs`.
pub fn table(
    res: &Resource,
    objs: &[Value],
    include: Include,
    rv: i64,
    cont: Option<&str>,
) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = cont {
        meta["continue"] = json!(c);
    }
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": columns(res).iter().map(|(name, prio, desc)| json!({
            "name": name,
            "type": "string",
            "format": if *name == "Name" { "name" } else { "" },
            "description": desc,
            "priority": prio,
        })).collect::<Vec<_>>(),
        "rows": objs.iter().map(|o| row(res, o, include)).collect::<Vec<_>>(),
    })
}

fn row(res: &Resource, obj: &Value, include: Include) -> Value {
    let mut r = json!({"cells": cells(res, obj)});
    match include {
        Include::None => {}
        Include::Object => r["object"] = obj.clone(),
        Include::Metadata => {
            r["object"] = json!({
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            })
        }
    }
    r
}

type Column = (&'static str, u8, &'static str);

fn columns(res: &Resource) -> Vec<Column> {
    const NAME: Column = ("Name", 0, "Name must be unique within a namespace.");
    const AGE: Column = (
        "Age",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    );
    match res.plural {
        "pods" => vec![
            NAME,
            (
                "Ready",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            (
                "Status",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            (
                "Restarts",
                0,
                "The number of times the containers in this pod have been restarted.",
            ),
            AGE,
            ("IP", 1, "IP address allocated to the pod."),
            ("Node", 1, "Name of the Node this pod is bound to."),
        ],
        "namespaces" => vec![NAME, ("Status", 0, "The status of the namespace"), AGE],
        "nodes" => vec![
            NAME,
            ("Status", 0, "The status of the node"),
            ("Roles", 0, "The roles of the node"),
            AGE,
            ("Version", 0, "Kubelet Version reported by the node."),
            ("Internal-IP", 1, "List of internal IPs of the node."),
        ],
        "services" => vec![
            NAME,
            ("Type", 0, "The type of the service."),
            ("Cluster-IP", 0, "The cluster IP of the service."),
            ("External-IP", 0, "The external IPs of the service."),
            ("Port(s)", 0, "The ports of the service."),
            AGE,
            ("Selector", 1, "The label selector of the service."),
        ],
        "endpoints" => vec![NAME, ("Endpoints", 0, "Endpoints of the service."), AGE],
        "endpointslices" => vec![
            NAME,
            ("AddressType", 0, "The IP protocol for this slice"),
            ("Ports", 0, "The ports in this slice"),
            ("Endpoints", 0, "The addresses in this slice"),
            AGE,
        ],
        "deployments" => vec![
            NAME,
            ("Ready", 0, "Number of ready pods / desired replicas."),
            (
                "Up-to-date",
                0,
                "Total number of non-terminated pods with the desired template.",
            ),
            ("Available", 0, "Number of available replicas."),
            AGE,
            ("Containers", 1, "Names of each container in the template."),
            (
                "Images",
                1,
                "Images referenced by each container in the template.",
            ),
            ("Selector", 1, "Label selector for pods."),
        ],
        "replicasets" => vec![
            NAME,
            ("Desired", 0, "Number of desired pods."),
            ("Current", 0, "Number of actually running pods."),
            ("Ready", 0, "Number of ready pods."),
            AGE,
            ("Containers", 1, "Names of each container in the template."),
            (
                "Images",
                1,
                "Images referenced by each container in the template.",
            ),
            ("Selector", 1, "Label selector for pods."),
        ],
        "leases" => vec![NAME, ("Holder", 0, "The holder of the lease."), AGE],
        "events" => vec![
            ("Last Seen", 0, "Time of the last occurrence."),
            ("Type", 0, "Type of the event."),
            ("Reason", 0, "Reason of the event."),
            ("Object", 0, "The object the event is about."),
            ("Message", 0, "The event's message."),
            NAME,
        ],
        "configmaps" => vec![NAME, ("Data", 0, "Number of data entries."), AGE],
        "secrets" => vec![
            NAME,
            ("Type", 0, "The type of the secret."),
            ("Data", 0, "Number of data entries."),
            AGE,
        ],
        _ => vec![NAME, AGE],
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn count(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn cells(res: &Resource, o: &Value) -> Vec<Value> {
    let name = s(&o["metadata"]["name"]);
    let age = age(&o["metadata"]["creationTimestamp"]);
    let cells: Vec<String> = match res.plural {
        "pods" => {
            let statuses = o["status"]["containerStatuses"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
            let ready = statuses.iter().filter(|c| c["ready"] == true).count();
            let restarts: i64 = statuses.iter().map(|c| count(&c["restartCount"])).sum();
            let mut status = s(&o["status"]["reason"]);
            if status.is_empty() {
                status = s(&o["status"]["phase"]);
            }
            for c in &statuses {
                let waiting = s(&c["state"]["waiting"]["reason"]);
                if !waiting.is_empty() {
                    status = waiting;
                }
            }
            if o["metadata"]["deletionTimestamp"].is_string() {
                status = "Terminating".into();
            }
            vec![
                name,
                format!("{ready}/{total}"),
                status,
                restarts.to_string(),
                age,
                or_none(s(&o["status"]["podIP"])),
                or_none(s(&o["spec"]["nodeName"])),
            ]
        }
        "namespaces" => vec![name, s(&o["status"]["phase"]), age],
        "nodes" => {
            let ready = o["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready");
            let mut status = match ready {
                Some(c) if c["status"] == "True" => "Ready".to_string(),
                Some(_) => "NotReady".to_string(),
                None => "Unknown".to_string(),
            };
            if o["spec"]["unschedulable"] == true {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<&str> = o["metadata"]["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/"))
                .collect();
            let ip = o["status"]["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["type"] == "InternalIP")
                .map(|a| s(&a["address"]))
                .unwrap_or_default();
            vec![
                name,
                status,
                or_none(roles.join(",")),
                age,
                s(&o["status"]["nodeInfo"]["kubeletVersion"]),
                or_none(ip),
            ]
        }
        "services" => {
            let ports: Vec<String> = o["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let np = if p["nodePort"].is_number() {
                        format!(":{}", p["nodePort"])
                    } else {
                        String::new()
                    };
                    format!("{}{np}/{}", p["port"], s(&p["protocol"]))
                })
                .collect();
            let ext: Vec<String> = o["spec"]["externalIPs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            let selector: Vec<String> = o["spec"]["selector"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", s(v)))
                .collect();
            vec![
                name,
                s(&o["spec"]["type"]),
                or_none(s(&o["spec"]["clusterIP"])),
                or_none(ext.join(",")),
                or_none(ports.join(",")),
                age,
                or_none(selector.join(",")),
            ]
        }
        "endpoints" => {
            let mut eps = Vec::new();
            for sub in o["subsets"].as_array().into_iter().flatten() {
                for a in sub["addresses"].as_array().into_iter().flatten() {
                    for p in sub["ports"].as_array().into_iter().flatten() {
                        eps.push(format!("{}:{}", s(&a["ip"]), p["port"]));
                    }
                }
            }
            vec![name, or_none(eps.join(",")), age]
        }
        "endpointslices" => {
            let ports: Vec<String> = o["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| s(&p["port"]))
                .collect();
            let addrs: Vec<String> = o["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                .map(|a| s(&a))
                .collect();
            vec![
                name,
                s(&o["addressType"]),
                or_none(ports.join(",")),
                or_none(addrs.join(",")),
                age,
            ]
        }
        "deployments" | "replicasets" => {
            let tmpl = &o["spec"]["template"]["spec"]["containers"];
            let names: Vec<String> = tmpl
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| s(&c["name"]))
                .collect();
            let images: Vec<String> = tmpl
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| s(&c["image"]))
                .collect();
            let selector =
                super::selectors::LabelSelector::from_object(&o["spec"]["selector"]).to_query();
            let desired = count(&o["spec"]["replicas"]);
            let st = &o["status"];
            let mut c = if res.plural == "deployments" {
                vec![
                    name,
                    format!("{}/{desired}", count(&st["readyReplicas"])),
                    count(&st["updatedReplicas"]).to_string(),
                    count(&st["availableReplicas"]).to_string(),
                ]
            } else {
                vec![
                    name,
                    desired.to_string(),
                    count(&st["replicas"]).to_string(),
                    count(&st["readyReplicas"]).to_string(),
                ]
            };
            c.extend([age, names.join(","), images.join(","), selector]);
            c
        }
        "leases" => vec![name, or_none(s(&o["spec"]["holderIdentity"])), age],
        "events" => {
            let last = if o["lastTimestamp"].is_string() {
                &o["lastTimestamp"]
            } else if o["eventTime"].is_string() {
                &o["eventTime"]
            } else {
                &o["metadata"]["creationTimestamp"]
            };
            let obj = format!(
                "{}/{}",
                s(&o["involvedObject"]["kind"]).to_lowercase(),
                s(&o["involvedObject"]["name"])
            );
            vec![
                age_of(last),
                s(&o["type"]),
                s(&o["reason"]),
                obj,
                s(&o["message"]),
                name,
            ]
        }
        "configmaps" => {
            let n = o["data"].as_object().map_or(0, |m| m.len())
                + o["binaryData"].as_object().map_or(0, |m| m.len());
            vec![name, n.to_string(), age]
        }
        "secrets" => vec![
            name,
            s(&o["type"]),
            o["data"].as_object().map_or(0, |m| m.len()).to_string(),
            age,
        ],
        _ => vec![name, age],
    };
    cells.into_iter().map(Value::String).collect()
}

fn age(ts: &Value) -> String {
    age_of(ts)
}

fn age_of(ts: &Value) -> String {
    let Some(t) = ts
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
    else {
        return "<unknown>".into();
    };
    human_duration((Utc::now() - t.with_timezone(&Utc)).num_seconds().max(0))
}

/// kubectl's short durations: `45s`, `3m20s`, `5h`, `2d3h`, `400d`.
pub fn human_duration(secs: i64) -> String {
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    if secs < 120 {
        format!("{secs}s")
    } else if m < 10 {
        if secs % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", secs % 60)
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if d < 2 {
        format!("{h}h")
    } else if d < 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else {
        format!("{d}d")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::resources::lookup;

    #[test]
    fn pod_rows_and_wide_columns() {
        let pods = lookup("", "v1", "pods").unwrap();
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": super::super::objects::now()},
                         "spec": {"containers": [{"name": "c"}], "nodeName": "n1"},
                         "status": {"phase": "Running", "podIP": "10.1.0.5",
                                    "containerStatuses": [{"ready": true, "restartCount": 2}]}});
        let t = table(pods, &[pod], Include::Metadata, 7, None);
        assert_eq!(t["metadata"]["resourceVersion"], "7");
        assert_eq!(t["columnDefinitions"][5]["priority"], 1);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "p");
        assert_eq!(cells[1], "1/1");
        assert_eq!(cells[2], "Running");
        assert_eq!(cells[3], "2");
        assert_eq!(cells[6], "n1");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(3600 * 5), "5h");
        assert_eq!(human_duration(86400 * 3 + 3600), "3d1h");
        assert!(wants_table(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!wants_table("application/json"));
    }
}
