//! Shared helpers for keel-cni's privileged tests: invoke the plugin exactly as a CNI runtime
//! does (env + stdin, inside the test's "node" namespace), run a conflist chain, and move TCP
//! between pod namespaces. Everything lives in namespaces the test created.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use keel_testkit::{NetnsGuard, StateRoot};
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_keel-cni");

/// What one plugin invocation printed.
#[derive(Debug)]
pub struct Reply {
    pub ok: bool,
    pub json: Value,
    pub raw: String,
}

impl Reply {
    pub fn code(&self) -> u64 {
        self.json["code"].as_u64().unwrap_or(0)
    }
}

/// One attachment's environment.
pub struct Env<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
    pub args: Option<&'a str>,
}

/// Runs `bin` in `host` with the CNI environment and `conf` on stdin.
pub fn invoke_bin(
    bin: &str,
    host: &NetnsGuard,
    env: &Env<'_>,
    conf: &Value,
    extra_env: &[(&str, &str)],
) -> anyhow::Result<Reply> {
    let mut cmd = host.command(bin);
    cmd.env("CNI_COMMAND", env.command)
        .env("CNI_CONTAINERID", env.container_id)
        .env("CNI_IFNAME", env.ifname)
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(ns) = env.netns {
        cmd.env("CNI_NETNS", ns);
    }
    if let Some(a) = env.args {
        cmd.env("CNI_ARGS", a);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().with_context(|| format!("spawn {bin}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = if raw.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&raw).with_context(|| {
            format!(
                "plugin printed non-JSON: {raw:?} (stderr {:?})",
                String::from_utf8_lossy(&out.stderr)
            )
        })?
    };
    Ok(Reply {
        ok: out.status.success(),
        json,
        raw,
    })
}

/// A test node: a "host" namespace the plugin runs in, and an allocation dir.
pub struct Node {
    pub host: NetnsGuard,
    pub state: StateRoot,
    pub bridge: String,
    pub name: String,
}

impl Node {
    pub fn new() -> anyhow::Result<Self> {
        let host = NetnsGuard::new()?;
        let state = StateRoot::new()?;
        // Bridge names only need to be unique per namespace, and each node has its own.
        Ok(Node {
            host,
            state,
            bridge: "kbr0".into(),
            name: "testnet".into(),
        })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.state.path().join("ipam")
    }

    /// A dual-stack config in the reference plugins' key names.
    pub fn conf(&self, v4: &str, v6: Option<&str>) -> Value {
        let mut ranges = vec![json!([{ "subnet": v4 }])];
        let mut routes = vec![json!({"dst": "0.0.0.0/0"})];
        if let Some(v6) = v6 {
            ranges.push(json!([{ "subnet": v6 }]));
            routes.push(json!({"dst": "::/0"}));
        }
        json!({
            "cniVersion": "1.1.0",
            "name": self.name,
            "type": "keel-cni",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": true,
            "mtu": 1450,
            "hairpinMode": true,
            "ipam": { "type": "keel-cni", "ranges": ranges, "routes": routes, "dataDir": self.data_dir() },
        })
    }

    pub fn invoke(
        &self,
        command: &str,
        cid: &str,
        netns: Option<&Path>,
        ifname: &str,
        conf: &Value,
    ) -> anyhow::Result<Reply> {
        invoke_bin(
            BIN,
            &self.host,
            &Env {
                command,
                container_id: cid,
                netns,
                ifname,
                args: None,
            },
            conf,
            &[],
        )
    }

    pub fn add(&self, cid: &str, pod: &NetnsGuard, conf: &Value) -> anyhow::Result<Value> {
        let r = self.invoke("ADD", cid, Some(&pod.path()), "eth0", conf)?;
        if !r.ok {
            bail!("ADD {cid} failed: {}", r.raw);
        }
        Ok(r.json)
    }

    /// DEL, then waits until its background part (veth deletion, address release) is done.
    pub fn del(&self, cid: &str, pod: Option<&NetnsGuard>, conf: &Value) -> anyhow::Result<()> {
        self.del_nowait(cid, pod, conf)?;
        self.settle()
    }

    /// DEL as a runtime sees it: returns once the plugin answered.
    pub fn del_nowait(
        &self,
        cid: &str,
        pod: Option<&NetnsGuard>,
        conf: &Value,
    ) -> anyhow::Result<()> {
        let path = pod.map(|p| p.path());
        let r = self.invoke("DEL", cid, path.as_deref(), "eth0", conf)?;
        if !r.ok {
            bail!("DEL {cid} failed: {}", r.raw);
        }
        Ok(())
    }

    /// Waits (10 s at most) until no DEL is finishing in the background.
    pub fn settle(&self) -> anyhow::Result<()> {
        let dir = self.data_dir().join(&self.name).join("deleting");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_dir(&dir).is_ok_and(|mut rd| rd.next().is_some()) {
            if std::time::Instant::now() > deadline {
                bail!(
                    "background deletions still pending after 10s in {}",
                    dir.display()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    /// GC keeping only `valid` (container ids, ifname eth0).
    pub fn gc(&self, conf: &Value, valid: &[&str]) -> anyhow::Result<Reply> {
        let mut c = conf.clone();
        c["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|id| json!({"containerID": id, "ifname": "eth0"}))
            .collect();
        self.invoke("GC", "", None, "", &c)
    }

    /// Allocation records (file names that are addresses) in the network's data dir.
    pub fn allocations(&self) -> Vec<String> {
        let dir = self.data_dir().join(&self.name);
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.parse::<IpAddr>().is_ok() || n.starts_with(".tmp-"))
            .collect()
    }

    /// Host-side veths this plugin made.
    pub fn veths(&self) -> anyhow::Result<Vec<String>> {
        let out = self.host.exec("ip", &["-o", "link", "show"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("kc"))
            .collect())
    }
}

/// The pod address of `family` in an ADD result.
pub fn addr_of(result: &Value, v4: bool) -> IpAddr {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse::<IpAddr>().ok())
        .find(|ip| ip.is_ipv4() == v4)
        .expect("result has an address of the family")
}

/// Sends "ping" from `client` to a listener in `server` on `ip`, expects "pong" back.
pub fn tcp_exchange(server: &NetnsGuard, client: &NetnsGuard, ip: IpAddr) -> anyhow::Result<()> {
    tcp_exchange_paths(&server.path(), &client.path(), ip)
}

/// [`tcp_exchange`] between namespaces given by path (e.g. `/proc/<pid>/ns/net`).
pub fn tcp_exchange_paths(server: &Path, client: &Path, ip: IpAddr) -> anyhow::Result<()> {
    let sns = keel_cni::netns::open(server)?;
    let cns = keel_cni::netns::open(client)?;
    let listener =
        keel_cni::netns::run_in(sns.as_fd(), || TcpListener::bind(SocketAddr::new(ip, 0)))??;
    let addr = listener.local_addr()?;
    let srv = std::thread::spawn(move || -> anyhow::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        anyhow::ensure!(&buf == b"ping", "server got {buf:?}");
        s.write_all(b"pong")?;
        Ok(())
    });
    let mut c = keel_cni::netns::run_in(cns.as_fd(), || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })?
    .with_context(|| format!("connect to {addr}"))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf)?;
    anyhow::ensure!(&buf == b"pong", "client got {buf:?}");
    srv.join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    Ok(())
}

/// Runs `cmd` and returns stdout, for checks inside namespaces.
pub fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd).args(args).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
