//! Label and field selectors, as lists and watches take them (`labelSelector=app=web,tier!=db`,
//! `fieldSelector=spec.nodeName=n1`). Pure parsing and matching on JSON objects; no I/O.

use std::collections::BTreeMap;

use serde_json::Value;

use super::status::ApiError;

/// One label requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<LabelSelector, ApiError> {
        let bad = |why: &str| {
            ApiError::bad_request(format!("unable to parse labelSelector {s:?}: {why}"))
        };
        let mut reqs = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let req = if let Some(k) = part.strip_prefix('!') {
                LabelReq::NotExists(key(k.trim()).map_err(|e| bad(&e))?)
            } else if let Some((k, v)) = part.split_once("!=") {
                LabelReq::NotEq(key(k.trim()).map_err(|e| bad(&e))?, v.trim().to_string())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                LabelReq::Eq(key(k.trim()).map_err(|e| bad(&e))?, v.trim().to_string())
            } else if let Some((k, vals)) = set_op(part, " notin ") {
                LabelReq::NotIn(key(k).map_err(|e| bad(&e))?, vals.map_err(|e| bad(&e))?)
            } else if let Some((k, vals)) = set_op(part, " in ") {
                LabelReq::In(key(k).map_err(|e| bad(&e))?, vals.map_err(|e| bad(&e))?)
            } else {
                LabelReq::Exists(key(part).map_err(|e| bad(&e))?)
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// From a `metav1.LabelSelector` object (matchLabels + matchExpressions).
    pub fn from_object(sel: &Value) -> LabelSelector {
        let mut reqs = Vec::new();
        if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in m {
                reqs.push(LabelReq::Eq(
                    k.clone(),
                    v.as_str().unwrap_or("").to_string(),
                ));
            }
        }
        for e in sel
            .get("matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let k = e["key"].as_str().unwrap_or("").to_string();
            let vals: Vec<String> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            reqs.push(match e["operator"].as_str().unwrap_or("") {
                "In" => LabelReq::In(k, vals),
                "NotIn" => LabelReq::NotIn(k, vals),
                "Exists" => LabelReq::Exists(k),
                _ => LabelReq::NotExists(k),
            });
        }
        LabelSelector(reqs)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches_labels(&self, labels: &BTreeMap<&str, &str>) -> bool {
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => labels.get(k.as_str()) == Some(&v.as_str()),
            LabelReq::NotEq(k, v) => labels.get(k.as_str()) != Some(&v.as_str()),
            LabelReq::In(k, vs) => labels
                .get(k.as_str())
                .is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => !labels
                .get(k.as_str())
                .is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::Exists(k) => labels.contains_key(k.as_str()),
            LabelReq::NotExists(k) => !labels.contains_key(k.as_str()),
        })
    }

    /// Whether the object's `metadata.labels` match.
    pub fn matches(&self, obj: &Value) -> bool {
        if self.0.is_empty() {
            return true;
        }
        self.matches_labels(&labels_of(obj))
    }

    /// The selector as a string (`status.selector` of a Scale).
    pub fn to_query(&self) -> String {
        self.0
            .iter()
            .map(|r| match r {
                LabelReq::Eq(k, v) => format!("{k}={v}"),
                LabelReq::NotEq(k, v) => format!("{k}!={v}"),
                LabelReq::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                LabelReq::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                LabelReq::Exists(k) => k.clone(),
                LabelReq::NotExists(k) => format!("!{k}"),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `metadata.labels` as a map.
pub fn labels_of(obj: &Value) -> BTreeMap<&str, &str> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn key(k: &str) -> Result<String, String> {
    if k.is_empty() || k.contains(|c: char| c.is_whitespace() || "(),=!".contains(c)) {
        return Err(format!("invalid label key {k:?}"));
    }
    Ok(k.to_string())
}

/// `key in (a,b)` -> (`key`, [a, b]).
fn set_op<'a>(part: &'a str, op: &str) -> Option<(&'a str, Result<Vec<String>, String>)> {
    let (k, rest) = part.split_once(op)?;
    let rest = rest.trim();
    let vals = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .map(|inner| {
            inner
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect()
        })
        .ok_or_else(|| format!("expected a parenthesized value list after {}", op.trim()));
    Some((k.trim(), vals))
}

/// Splits on commas outside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// A parsed `fieldSelector`: `field=value` and `field!=value` terms on dotted paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// The fields a field selector may name, as kube-apiserver supports them for our resources.
const FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.unschedulable",
    "status.phase",
    "status.podIP",
    "involvedObject.kind",
    "involvedObject.name",
    "involvedObject.namespace",
    "involvedObject.uid",
    "reason",
    "type",
];

impl FieldSelector {
    pub fn parse(s: &str) -> Result<FieldSelector, ApiError> {
        let mut terms = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector term {part:?}: expected field=value or field!=value"
                )));
            };
            let field = field.trim();
            if !FIELDS.contains(&field) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            terms.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The single `metadata.name=` value, if the selector pins one (a get in disguise).
    pub fn pinned_name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(f, eq, _)| *eq && f == "metadata.name")
            .map(|(_, _, v)| v.as_str())
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, value)| {
            let actual = field
                .split('.')
                .try_fold(obj, |v, seg| v.get(seg))
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            (actual == *value) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels},
               "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}})
    }

    #[test]
    fn label_selectors_parse_and_match() {
        let o = obj(json!({"app": "web", "tier": "fe"}));
        for (sel, want) in [
            ("", true),
            ("app=web", true),
            ("app==web,tier=fe", true),
            ("app!=web", false),
            ("app in (web, api)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing,app in (web),tier notin (db)", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
        assert_eq!(LabelSelector::parse("a in b").unwrap_err().code, 400);
    }

    #[test]
    fn label_selector_objects_match() {
        let sel = LabelSelector::from_object(&json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["fe"]}]
        }));
        assert!(sel.matches(&obj(json!({"app": "web", "tier": "fe"}))));
        assert!(!sel.matches(&obj(json!({"app": "web"}))));
        assert_eq!(sel.to_query(), "app=web,tier in (fe)");
    }

    #[test]
    fn field_selectors_parse_and_match() {
        let o = obj(json!({}));
        for (sel, want) in [
            ("metadata.name=a", true),
            ("metadata.namespace==ns,spec.nodeName=n1", true),
            ("spec.nodeName!=n1", false),
            ("status.phase=Running", true),
            ("spec.nodeName=", false),
        ] {
            assert_eq!(
                FieldSelector::parse(sel).unwrap().matches(&o),
                want,
                "{sel}"
            );
        }
        let unbound = json!({"metadata": {"name": "b"}, "spec": {}});
        assert!(
            FieldSelector::parse("spec.nodeName=")
                .unwrap()
                .matches(&unbound)
        );
        assert_eq!(FieldSelector::parse("spec.bogus=x").unwrap_err().code, 400);
        assert_eq!(
            FieldSelector::parse("metadata.name=a")
                .unwrap()
                .pinned_name(),
            Some("a")
        );
    }
}
