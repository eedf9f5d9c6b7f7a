//! The CNI wire protocol: the `CNI_*` environment, the verbs, version negotiation and the error
//! object a plugin prints on failure (spec 1.1, "Execution Protocol" and "Error codes").
//!
//! Pure: reads nothing from the process itself; the binary hands the environment in.

use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;

/// Versions this plugin can speak, oldest first. Results are written in the requested one.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version used when the caller names none.
pub const LATEST_VERSION: &str = "1.1.0";

/// The spec's well-known error codes, plus this plugin's own (100+).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist (here: its network namespace is missing).
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables (`CNI_COMMAND`, `CNI_IFNAME`, ...).
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content (bad JSON).
    pub const DECODE_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin is not available, cannot service ADD.
    pub const NOT_AVAILABLE: u32 = 50;
    /// Plugin specific: every address of a range set is taken.
    pub const RANGE_EXHAUSTED: u32 = 100;
    /// Plugin specific: a requested address is outside the ranges or already taken.
    pub const ADDRESS_UNAVAILABLE: u32 = 101;
    /// Plugin specific: a netlink request failed.
    pub const NETLINK_FAILURE: u32 = 102;
    /// Plugin specific: setting up masquerade (nftables / iptables) failed.
    pub const MASQUERADE_FAILURE: u32 = 103;
    /// Plugin specific: CHECK found the attachment not as ADD left it.
    pub const CHECK_FAILED: u32 = 104;
}

/// Errors of the protocol layer.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// CNI_COMMAND is missing or names no known verb.
    #[error("CNI_COMMAND {0:?} is not one of ADD, DEL, CHECK, VERSION, GC, STATUS")]
    UnknownCommand(String),
    /// A variable the verb needs is unset or empty.
    #[error("environment variable {0} is required for this command")]
    MissingEnv(&'static str),
    /// CNI_IFNAME cannot name a Linux interface.
    #[error(
        "CNI_IFNAME {0:?} is not a valid interface name (1-15 bytes, no '/', ':' or whitespace)"
    )]
    BadIfName(String),
    /// CNI_ARGS is not `K=V;K=V`.
    #[error("CNI_ARGS {0:?} is not a list of KEY=VALUE pairs separated by ';'")]
    BadArgs(String),
    /// The requested version is not spoken here.
    #[error("CNI version {0} is not supported (supported: 0.3.0 to 1.1.0)")]
    UnsupportedVersion(String),
    /// A verb used with a config version that predates it.
    #[error("{verb} needs cniVersion {needs} or later, config says {got}")]
    VerbTooNew {
        /// The verb.
        verb: &'static str,
        /// The first version defining it.
        needs: &'static str,
        /// The version in the config.
        got: String,
    },
}

impl ProtocolError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        match self {
            Self::UnknownCommand(_)
            | Self::MissingEnv(_)
            | Self::BadIfName(_)
            | Self::BadArgs(_) => code::INVALID_ENV,
            Self::UnsupportedVersion(_) | Self::VerbTooNew { .. } => code::INCOMPATIBLE_VERSION,
        }
    }
}

/// The CNI verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container to the network.
    Add,
    /// Detach it; must succeed when already detached.
    Del,
    /// Verify an attachment still looks as ADD left it.
    Check,
    /// Print the supported versions.
    Version,
    /// Release everything not in `cni.dev/valid-attachments`.
    Gc,
    /// Say whether ADD would work.
    Status,
}

impl Command {
    fn parse(s: &str) -> Result<Self, ProtocolError> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "VERSION" => Self::Version,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            other => return Err(ProtocolError::UnknownCommand(other.to_string())),
        })
    }
}

/// One invocation as the runtime described it in the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The verb.
    pub command: Command,
    /// CNI_CONTAINERID (empty for VERSION, GC, STATUS).
    pub container_id: String,
    /// CNI_NETNS (may be absent for DEL).
    pub netns: Option<PathBuf>,
    /// CNI_IFNAME (empty for VERSION, GC, STATUS).
    pub ifname: String,
    /// CNI_ARGS parsed into pairs.
    pub args: HashMap<String, String>,
    /// CNI_PATH split on ':'.
    pub path: Vec<PathBuf>,
}

/// Reads the invocation out of an environment lookup (`std::env::var` in the binary).
pub fn parse_env(get: impl Fn(&str) -> Option<String>) -> Result<Invocation, ProtocolError> {
    let non_empty = |k: &str| get(k).filter(|v| !v.is_empty());
    let command = Command::parse(&non_empty("CNI_COMMAND").unwrap_or_default())?;
    let needs_attachment = matches!(command, Command::Add | Command::Del | Command::Check);
    let needs_netns = matches!(command, Command::Add | Command::Check);
    let container_id = non_empty("CNI_CONTAINERID").unwrap_or_default();
    if needs_attachment && container_id.is_empty() {
        return Err(ProtocolError::MissingEnv("CNI_CONTAINERID"));
    }
    let netns = non_empty("CNI_NETNS").map(PathBuf::from);
    if needs_netns && netns.is_none() {
        return Err(ProtocolError::MissingEnv("CNI_NETNS"));
    }
    let ifname = non_empty("CNI_IFNAME").unwrap_or_default();
    if needs_attachment {
        if ifname.is_empty() {
            return Err(ProtocolError::MissingEnv("CNI_IFNAME"));
        }
        validate_ifname(&ifname)?;
    }
    let args = match non_empty("CNI_ARGS") {
        Some(raw) => parse_args(&raw)?,
        None => HashMap::new(),
    };
    let path = non_empty("CNI_PATH")
        .map(|p| {
            p.split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    Ok(Invocation {
        command,
        container_id,
        netns,
        ifname,
        args,
        path,
    })
}

/// Checks that `name` is usable as a Linux interface name (the kernel's `dev_valid_name`).
pub fn validate_ifname(name: &str) -> Result<(), ProtocolError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(ProtocolError::BadIfName(name.to_string()))
    }
}

/// Parses `CNI_ARGS` (`IgnoreUnknown=1;IP=10.1.0.5;K8S_POD_NAME=x`).
pub fn parse_args(raw: &str) -> Result<HashMap<String, String>, ProtocolError> {
    let mut out = HashMap::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| ProtocolError::BadArgs(raw.to_string()))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Picks the version to speak: the config's `cniVersion`, else the highest supported entry of
/// `cniVersions`, else the latest.
pub fn negotiate(
    cni_version: Option<&str>,
    cni_versions: &[String],
) -> Result<String, ProtocolError> {
    if let Some(v) = cni_version.filter(|v| !v.is_empty()) {
        return if SUPPORTED_VERSIONS.contains(&v) {
            Ok(v.to_string())
        } else {
            Err(ProtocolError::UnsupportedVersion(v.to_string()))
        };
    }
    if cni_versions.is_empty() {
        return Ok(LATEST_VERSION.to_string());
    }
    SUPPORTED_VERSIONS
        .iter()
        .rev()
        .find(|s| cni_versions.iter().any(|v| v == *s))
        .map(|s| s.to_string())
        .ok_or_else(|| ProtocolError::UnsupportedVersion(cni_versions.join(",")))
}

/// Compares two dotted versions numerically.
pub fn version_at_least(version: &str, min: &str) -> bool {
    let parse = |s: &str| -> Vec<u32> { s.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(version) >= parse(min)
}

/// Rejects verbs newer than the config's version (CHECK: 0.4.0, GC/STATUS: 1.1.0).
pub fn check_verb_version(command: Command, version: &str) -> Result<(), ProtocolError> {
    let (verb, needs) = match command {
        Command::Check => ("CHECK", "0.4.0"),
        Command::Gc => ("GC", "1.1.0"),
        Command::Status => ("STATUS", "1.1.0"),
        _ => return Ok(()),
    };
    if version_at_least(version, needs) {
        Ok(())
    } else {
        Err(ProtocolError::VerbTooNew {
            verb,
            needs,
            got: version.to_string(),
        })
    }
}

/// The object VERSION prints.
#[derive(Debug, Serialize)]
pub struct VersionInfo {
    /// Echo of the requested version (or the latest).
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// Every version this plugin speaks.
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<&'static str>,
}

/// The VERSION answer for a request carrying `requested` (if any).
pub fn version_info(requested: Option<&str>) -> VersionInfo {
    let cni_version = requested
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(LATEST_VERSION)
        .to_string();
    VersionInfo {
        cni_version,
        supported_versions: SUPPORTED_VERSIONS.to_vec(),
    }
}

/// The error object printed on stdout when a verb fails.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ErrorReply {
    /// The version of the request (or the latest).
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// A spec code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer context, if any.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn add_needs_container_netns_and_ifname() {
        let e = parse_env(env(&[("CNI_COMMAND", "ADD")])).unwrap_err();
        assert!(matches!(e, ProtocolError::MissingEnv("CNI_CONTAINERID")));
        let e = parse_env(env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c")])).unwrap_err();
        assert!(matches!(e, ProtocolError::MissingEnv("CNI_NETNS")));
        assert_eq!(e.code(), code::INVALID_ENV);
        let inv = parse_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;IP=10.0.0.5"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ]))
        .unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.args["IP"], "10.0.0.5");
        assert_eq!(inv.path.len(), 2);
    }

    #[test]
    fn del_does_not_need_netns_and_version_needs_nothing() {
        let inv = parse_env(env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_IFNAME", "eth0"),
        ]));
        assert!(inv.unwrap().netns.is_none());
        assert_eq!(
            parse_env(env(&[("CNI_COMMAND", "VERSION")]))
                .unwrap()
                .command,
            Command::Version
        );
        assert!(matches!(
            parse_env(env(&[("CNI_COMMAND", "FROB")])),
            Err(ProtocolError::UnknownCommand(_))
        ));
    }

    #[test]
    fn ifname_validation() {
        assert!(validate_ifname("eth0").is_ok());
        assert!(validate_ifname("a234567890123456").is_err());
        assert!(validate_ifname("a/b").is_err());
        assert!(validate_ifname("a b").is_err());
        assert!(validate_ifname("..").is_err());
        let e = parse_env(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "way-too-long-name0"),
        ]))
        .unwrap_err();
        assert_eq!(e.code(), code::INVALID_ENV);
    }

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(Some("1.0.0"), &[]).unwrap(), "1.0.0");
        assert_eq!(negotiate(None, &[]).unwrap(), "1.1.0");
        let vs = vec![
            "0.4.0".to_string(),
            "1.0.0".to_string(),
            "9.9.9".to_string(),
        ];
        assert_eq!(negotiate(None, &vs).unwrap(), "1.0.0");
        let e = negotiate(Some("0.2.0"), &[]).unwrap_err();
        assert_eq!(e.code(), code::INCOMPATIBLE_VERSION);
        assert!(check_verb_version(Command::Gc, "1.0.0").is_err());
        assert!(check_verb_version(Command::Gc, "1.1.0").is_ok());
        assert!(check_verb_version(Command::Check, "0.3.1").is_err());
        assert!(version_at_least("1.10.0", "1.9.0"));
    }

    #[test]
    fn version_reply() {
        let v = serde_json::to_value(version_info(Some("0.4.0"))).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
        assert_eq!(version_info(Some("7.0.0")).cni_version, "1.1.0");
    }
}
