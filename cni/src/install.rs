//! `keel cni install`: copy the plugin binary into the CNI bin dir and write a conflist into the
//! CNI conf dir, both atomically (temp file + rename) so a runtime never sees half a file.

use serde_json::json;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Install failures.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// What to install.
#[derive(Debug, Clone)]
pub struct InstallSpec {
    /// The `keel-cni` binary to copy.
    pub binary: PathBuf,
    /// CNI bin dir (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// CNI conf dir (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// Network name.
    pub network: String,
    /// Bridge name.
    pub bridge: String,
    /// Pod subnets (one range set each), IPv4 and/or IPv6.
    pub subnets: Vec<ipnet::IpNet>,
    /// MTU, if not the default.
    pub mtu: Option<u32>,
    /// Masquerade egress.
    pub ip_masq: bool,
    /// Also chain Debian/reference `portmap` (hostPort support).
    pub portmap: bool,
    /// File name of the conflist.
    pub conflist_name: String,
    /// Where IPAM keeps its allocations (`ipam.dataDir`); None: host-local's default,
    /// /var/lib/cni/networks.
    pub ipam_data_dir: Option<PathBuf>,
}

/// The conflist for `spec`.
pub fn conflist(spec: &InstallSpec) -> serde_json::Value {
    let ranges: Vec<_> = spec
        .subnets
        .iter()
        .map(|s| json!([{ "subnet": s.trunc().to_string() }]))
        .collect();
    let mut routes = Vec::new();
    if spec.subnets.iter().any(|s| s.addr().is_ipv4()) {
        routes.push(json!({"dst": "0.0.0.0/0"}));
    }
    if spec.subnets.iter().any(|s| s.addr().is_ipv6()) {
        routes.push(json!({"dst": "::/0"}));
    }
    let mut main = json!({
        "type": "keel-cni",
        "bridge": spec.bridge,
        "isGateway": true,
        "ipMasq": spec.ip_masq,
        "hairpinMode": true,
        "ipam": { "type": "keel-cni", "ranges": ranges, "routes": routes },
    });
    if let Some(m) = spec.mtu {
        main["mtu"] = json!(m);
    }
    if let Some(d) = &spec.ipam_data_dir {
        main["ipam"]["dataDir"] = json!(d);
    }
    let mut plugins = vec![main];
    if spec.portmap {
        plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    }
    // 1.0.0 for the list: what containerd 1.6/1.7 and the reference chained plugins speak;
    // cniVersions lets 1.1 runtimes pick 1.1.0.
    json!({ "cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.1.0"], "name": spec.network, "plugins": plugins })
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), InstallError> {
    let err = |op| {
        move |source| InstallError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(err("create dir for"))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("keel")
    ));
    let mut f = fs::File::create(&tmp).map_err(err("create"))?;
    f.write_all(data).map_err(err("write"))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err("chmod"))?;
    f.sync_all().map_err(err("fsync"))?;
    fs::rename(&tmp, path).map_err(err("rename into"))
}

/// Installs binary and conflist; returns their paths.
pub fn install(spec: &InstallSpec) -> Result<(PathBuf, PathBuf), InstallError> {
    let bin = fs::read(&spec.binary).map_err(|source| InstallError::Io {
        op: "read",
        path: spec.binary.clone(),
        source,
    })?;
    let bin_path = spec.bin_dir.join("keel-cni");
    write_atomic(&bin_path, &bin, 0o755)?;
    let conf_path = spec.conf_dir.join(&spec.conflist_name);
    let text = serde_json::to_vec_pretty(&conflist(spec)).unwrap_or_default();
    write_atomic(&conf_path, &text, 0o644)?;
    Ok((bin_path, conf_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> InstallSpec {
        InstallSpec {
            binary: dir.join("src-bin"),
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            network: "keel".into(),
            bridge: "keel0".into(),
            subnets: vec![
                "10.88.0.0/16".parse().unwrap(),
                "fd00:88::/64".parse().unwrap(),
            ],
            mtu: None,
            ip_masq: true,
            portmap: true,
            conflist_name: "10-keel.conflist".into(),
            ipam_data_dir: None,
        }
    }

    #[test]
    fn writes_binary_and_parsable_conflist() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("src-bin"), b"\x7fELF").unwrap();
        let (bin, conf) = install(&spec(d.path())).unwrap();
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let v: serde_json::Value = serde_json::from_slice(&fs::read(conf).unwrap()).unwrap();
        assert_eq!(v["plugins"][1]["type"], "portmap");
        let mut plugin = v["plugins"][0].clone();
        plugin["name"] = v["name"].clone();
        plugin["cniVersion"] = v["cniVersion"].clone();
        let net = crate::config::validate(serde_json::from_value(plugin).unwrap()).unwrap();
        assert_eq!(net.range_sets.len(), 2);
        assert!(net.ip_masq && net.is_gateway);
    }
}
