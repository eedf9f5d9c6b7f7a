//! Who a request comes from (bearer tokens) and what a node may write.
//!
//! Two kinds of credentials: the admin token (may do anything) and node credentials
//! `node.<node-name>.<mac>`, where `<mac>` is HMAC-SHA256 of the node name keyed by the node join
//! token. An agent holding the join token mints its own credential with [`node_credential`]; the
//! server checks the MAC, so a node credential names exactly one node. Like Kubernetes' Node
//! authorizer, a node may read everything but write only its own Node (and status), its Lease, the
//! status of pods bound to it, deletes of those pods, and events.
//!
//! Must not touch the store: callers pass what the decision needs.

use sha2::{Digest, Sha256};

use super::pki::hex;
use super::status::ApiError;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Admin,
    Node(String),
}

/// The tokens the server accepts.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub admin: String,
    pub node_join: String,
}

impl Tokens {
    /// The identity of an `Authorization` header value; 401 when missing or unknown.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Identity, ApiError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        if constant_time_eq(token.as_bytes(), self.admin.as_bytes()) {
            return Ok(Identity::Admin);
        }
        if let Some(rest) = token.strip_prefix("node.")
            && let Some((name, mac)) = rest.rsplit_once('.')
            && !name.is_empty()
            && constant_time_eq(
                mac.as_bytes(),
                hex(&hmac_sha256(self.node_join.as_bytes(), name.as_bytes())).as_bytes(),
            )
        {
            return Ok(Identity::Node(name.to_string()));
        }
        Err(ApiError::unauthorized())
    }
}

/// The bearer credential of node `node_name`, minted from the cluster's node join token.
pub fn node_credential(join_token: &str, node_name: &str) -> String {
    format!(
        "node.{node_name}.{}",
        hex(&hmac_sha256(join_token.as_bytes(), node_name.as_bytes()))
    )
}

/// HMAC-SHA256 (RFC 2104); written out because it is a dozen lines over sha2.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A write a node asks for, with what the decision needs to know.
#[derive(Debug)]
pub struct WriteRequest<'a> {
    /// `nodes`, `pods`, `leases`, `events`, ...
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    /// `create`, `update`, `patch`, `delete`.
    pub verb: &'a str,
    /// For pods: the node the stored pod is bound to.
    pub bound_node: Option<&'a str>,
}

/// Whether `who` may perform the write; 403 naming the rule otherwise.
pub fn authorize_write(who: &Identity, req: &WriteRequest<'_>) -> Result<(), ApiError> {
    let node = match who {
        Identity::Admin => return Ok(()),
        Identity::Node(n) => n.as_str(),
    };
    let allowed = match (req.resource, req.subresource) {
        ("nodes", None | Some("status")) => req.name == Some(node),
        ("leases", None) => req.namespace == Some("kube-node-lease") && req.name == Some(node),
        ("pods", Some("status")) => req.bound_node == Some(node),
        ("pods", None) => req.verb == "delete" && req.bound_node == Some(node),
        ("events", None) => matches!(req.verb, "create" | "update" | "patch"),
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        let what = match req.subresource {
            Some(s) => format!("{}/{s}", req.resource),
            None => req.resource.to_string(),
        };
        Err(ApiError::forbidden(format!(
            "{what} \"{}\" is forbidden: User \"system:node:{node}\" cannot {} it: a node may \
             write only its own Node and Lease and the status of its own pods",
            req.name.unwrap_or(""),
            req.verb
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens {
            admin: "admintoken".into(),
            node_join: "join".into(),
        }
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn tokens_identify_callers() {
        let t = tokens();
        assert_eq!(
            t.authenticate(Some("Bearer admintoken")).unwrap(),
            Identity::Admin
        );
        let cred = node_credential("join", "n1");
        assert_eq!(
            t.authenticate(Some(&format!("Bearer {cred}"))).unwrap(),
            Identity::Node("n1".into())
        );
        let forged = cred.replace("node.n1.", "node.n2.");
        assert_eq!(
            t.authenticate(Some(&format!("Bearer {forged}")))
                .unwrap_err()
                .code,
            401
        );
        assert_eq!(t.authenticate(None).unwrap_err().code, 401);
        assert_eq!(t.authenticate(Some("Bearer join")).unwrap_err().code, 401);
    }

    #[test]
    fn nodes_write_only_their_own_objects() {
        let n1 = Identity::Node("n1".into());
        let req = |resource, sub, name, bound| WriteRequest {
            resource,
            subresource: sub,
            namespace: Some("kube-node-lease"),
            name,
            verb: "update",
            bound_node: bound,
        };
        assert!(authorize_write(&n1, &req("nodes", None, Some("n1"), None)).is_ok());
        assert!(authorize_write(&n1, &req("nodes", Some("status"), Some("n2"), None)).is_err());
        assert!(authorize_write(&n1, &req("leases", None, Some("n1"), None)).is_ok());
        assert!(authorize_write(&n1, &req("pods", Some("status"), Some("p"), Some("n1"))).is_ok());
        assert!(authorize_write(&n1, &req("pods", Some("status"), Some("p"), Some("n2"))).is_err());
        assert!(authorize_write(&n1, &req("pods", None, Some("p"), Some("n1"))).is_err());
        assert!(authorize_write(&n1, &req("secrets", None, Some("s"), None)).is_err());
        assert!(authorize_write(&Identity::Admin, &req("secrets", None, Some("s"), None)).is_ok());
    }
}
