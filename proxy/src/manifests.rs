//! The file source: a multi-document YAML file of Services, EndpointSlices and Pods (the Pods for
//! their hostPorts; what admins and tests give `keel proxy --manifests PATH`). Other kinds are
//! ignored; a `List` is flattened.

use std::path::Path;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("read manifests {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// YAML syntax error.
    #[error("manifests are not valid YAML: {0}")]
    Yaml(String),
    /// A document of a known kind that does not match its schema.
    #[error("manifest document {index} ({kind} {name}): {message}")]
    Invalid {
        index: usize,
        kind: String,
        name: String,
        message: String,
    },
}

#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    /// Pods whose hostPorts this node serves (`model::hostport` says which count).
    pub pods: Vec<Pod>,
}

pub fn read_manifests(path: &Path) -> Result<Manifests, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_manifests(&text)
}

pub fn parse_manifests(text: &str) -> Result<Manifests, ManifestError> {
    // The parser's default budget (1,024 documents, 250,000 nodes) guards against hostile input;
    // this file is the admin's own and a cluster's worth (two documents per Service) is larger.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 1_000_000,
            max_nodes: 100_000_000,
            max_events: 500_000_000,
        },
    };
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple_with_options(text, options)
        .map_err(|e| ManifestError::Yaml(e.to_string()))?;
    let mut out = Manifests::default();
    let mut queue: Vec<serde_json::Value> = docs;
    queue.reverse();
    let mut index = 0;
    while let Some(doc) = queue.pop() {
        if doc.is_null() {
            continue; // empty document between `---`
        }
        index += 1;
        let kind = doc
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_owned();
        let name = doc
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or("?")
            .to_owned();
        let invalid = |e: serde_json::Error| ManifestError::Invalid {
            index,
            kind: kind.clone(),
            name: name.clone(),
            message: e.to_string(),
        };
        match kind.as_str() {
            "Service" => out
                .services
                .push(serde_json::from_value(doc).map_err(invalid)?),
            "EndpointSlice" => out
                .slices
                .push(serde_json::from_value(doc).map_err(invalid)?),
            "Pod" => out.pods.push(serde_json::from_value(doc).map_err(invalid)?),
            k if k.ends_with("List") => {
                if let Some(items) = doc.get("items").and_then(|i| i.as_array()) {
                    queue.extend(items.iter().rev().cloned());
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documents_and_lists_and_ignores_other_kinds() {
        let m = parse_manifests(
            "---\nkind: ConfigMap\nmetadata: {name: x}\n---\nkind: List\nitems:\n- {kind: Service, apiVersion: v1, metadata: {name: a}}\n- {kind: Pod, apiVersion: v1, metadata: {name: p}}\n---\n---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata: {name: b}\naddressType: IPv4\nendpoints: []\n",
        )
        .unwrap();
        assert_eq!(m.services.len(), 1);
        assert_eq!(m.slices.len(), 1);
        assert_eq!(m.pods.len(), 1);
    }

    #[test]
    fn schema_errors_name_the_document() {
        let e = parse_manifests("kind: Service\nmetadata: {name: web}\nspec: {ports: 5}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Service web"), "{e}");
        let e = parse_manifests("kind: Pod\nmetadata: {name: p}\nspec: {containers: 3}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("Pod p"), "{e}");
        let e = parse_manifests("kind: [").unwrap_err().to_string();
        assert!(e.contains("YAML"), "{e}");
    }
}
