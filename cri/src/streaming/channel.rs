//! Pure: the Kubernetes WebSocket channel protocols (`v4.channel.k8s.io`, `v5.channel.k8s.io`,
//! as in `k8s.io/apimachinery/pkg/util/httpstream/wsstream`): protocol negotiation, framing
//! (each binary message is one channel byte then data), and the v4 exec status (a JSON
//! `metav1.Status` on the error channel).

use serde_json::json;

/// Exec/attach channels.
pub(crate) const STDIN: u8 = 0;
pub(crate) const STDOUT: u8 = 1;
pub(crate) const STDERR: u8 = 2;
pub(crate) const ERROR: u8 = 3;
pub(crate) const RESIZE: u8 = 4;
/// v5: a message on this channel whose one data byte is a channel closes that channel.
pub(crate) const CLOSE: u8 = 255;

pub(crate) const V5: &str = "v5.channel.k8s.io";
pub(crate) const V4: &str = "v4.channel.k8s.io";

/// What exec and attach speak, best first.
pub(crate) const EXEC_PROTOCOLS: &[&str] = &[V5, V4];
/// What port-forward speaks (kubelet's WebSocket port-forward: `v4.channel.k8s.io`).
pub(crate) const PORT_FORWARD_PROTOCOLS: &[&str] = &[V4];

/// The protocol to answer for a `Sec-WebSocket-Protocol` header: the first one the client
/// offers that is in `supported`, as wsstream picks.
pub(crate) fn negotiate(offered: &str, supported: &[&'static str]) -> Option<&'static str> {
    offered
        .split(',')
        .map(str::trim)
        .find_map(|p| supported.iter().copied().find(|s| *s == p))
}

/// One message: `channel` then `data`.
pub(crate) fn frame(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    out
}

/// The v4 status of an exec that ran: Success, or Failure with an ExitCode cause (what
/// kubectl turns into its own exit code).
pub(crate) fn exit_status(code: i32) -> Vec<u8> {
    let status = if code == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else {
        json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit code {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        })
    };
    status.to_string().into_bytes()
}

/// The v4 status of an exec that could not run.
pub(crate) fn error_status(message: &str) -> Vec<u8> {
    json!({"metadata": {}, "status": "Failure", "message": message})
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_offered_supported_protocol_wins() {
        assert_eq!(
            negotiate("v5.channel.k8s.io, v4.channel.k8s.io", EXEC_PROTOCOLS),
            Some(V5)
        );
        assert_eq!(
            negotiate("base64.channel.k8s.io,v4.channel.k8s.io", EXEC_PROTOCOLS),
            Some(V4)
        );
        assert_eq!(negotiate("v5.channel.k8s.io", PORT_FORWARD_PROTOCOLS), None);
        assert_eq!(negotiate("", EXEC_PROTOCOLS), None);
    }

    #[test]
    fn exit_codes_become_v4_statuses() {
        let ok: serde_json::Value = serde_json::from_slice(&exit_status(0)).unwrap();
        assert_eq!(ok["status"], "Success");
        let failed: serde_json::Value = serde_json::from_slice(&exit_status(3)).unwrap();
        assert_eq!(failed["status"], "Failure");
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        assert_eq!(frame(STDOUT, b"hi"), b"\x01hi");
    }
}
