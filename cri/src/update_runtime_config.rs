//! UpdateRuntimeConfig: kubelet hands over the node's pod CIDRs (`spec.podCIDRs`, comma-separated
//! for dual stack). They are validated and kept in memory, reported by Status, and will feed the
//! CNI config when pods land. An empty CIDR leaves the previous value, as containerd does.

use std::net::IpAddr;

use crate::service::CriService;
use crate::{CriError, api};

const FIELD: &str = "runtime_config.network_config.pod_cidr";

pub(crate) async fn update_runtime_config(
    svc: &CriService,
    req: api::UpdateRuntimeConfigRequest,
) -> Result<api::UpdateRuntimeConfigResponse, CriError> {
    let cidr = req
        .runtime_config
        .and_then(|c| c.network_config)
        .map(|n| n.pod_cidr)
        .unwrap_or_default();
    let cidrs = parse_pod_cidrs(&cidr)?;
    if !cidrs.is_empty() {
        tracing::info!(pod_cidrs = ?cidrs, "pod CIDRs updated");
        svc.set_pod_cidrs(cidrs);
    }
    Ok(api::UpdateRuntimeConfigResponse {})
}

/// `10.244.1.0/24` or `10.244.1.0/24,fd00:1::/64`: each part an address and a prefix length
/// that fits it. Empty input is no CIDR.
fn parse_pod_cidrs(s: &str) -> Result<Vec<String>, CriError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            let bad = |why: &str| CriError::invalid(FIELD, format!("{part:?}: {why}"));
            let (addr, len) = part
                .split_once('/')
                .ok_or_else(|| bad("expected ADDRESS/PREFIX"))?;
            let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
            let len: u8 = len.parse().map_err(|_| bad("bad prefix length"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            if len > max {
                return Err(bad("prefix length too long for the address family"));
            }
            Ok(part.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cidrs_parse_single_and_dual_stack() {
        assert_eq!(
            parse_pod_cidrs("10.244.1.0/24").unwrap(),
            vec!["10.244.1.0/24"]
        );
        assert_eq!(
            parse_pod_cidrs("10.244.1.0/24, fd00:1::/64").unwrap(),
            vec!["10.244.1.0/24", "fd00:1::/64"]
        );
        assert!(parse_pod_cidrs("").unwrap().is_empty());
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "fd00::/129", "10.0.0.0/a"] {
            let e = parse_pod_cidrs(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
            assert!(e.to_string().contains(FIELD), "{e}");
        }
    }
}
