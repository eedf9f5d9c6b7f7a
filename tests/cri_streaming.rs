//! End-to-end tests of `keel cri`'s streaming server: Exec and PortForward answer a URL, and a
//! WebSocket client (what kubectl >= 1.30 speaks) connected to it runs a command with stdin,
//! reads its exit status, follows a container's output (attach), and forwards bytes to a port
//! in the pod. The daemon runs inside a
//! network namespace the test makes (as in tests/cri_pods.rs), so the streaming server's
//! 127.0.0.1 is that namespace's: the client's TCP connections are made from a thread that
//! entered it. Privileged (root): namespaces, mounts, cgroups.
//!
//! Needs `target/debug/keel-cni` (`cargo build -p keel-cni`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use keel_cri::api;
use keel_cri::api::runtime_service_client::RuntimeServiceClient;
use keel_cri::streaming::spdy;
use keel_cri::tonic::transport::Channel;
use keel_testkit::image_builder::{MediaTypes, Variant, build_cached, single_expect};
use keel_testkit::{CgroupGuard, NetnsGuard, StateRoot, privileged};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const IMAGE: &str = "example.com/keel/busybox:v1";

type Client = RuntimeServiceClient<Channel>;
type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

fn keel_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keel"))
}

/// A node as in tests/cri_pods.rs: a network namespace, a cgroup parent, a state root with
/// the image and keel-cni, and a `keel cri` inside the namespace. Drop kills the daemon and
/// removes every pod and container left, the cgroups, the namespace and the state root.
struct Node {
    child: Option<Child>,
    cgroup: Option<CgroupGuard>,
    netns: Option<NetnsGuard>,
    state: Option<StateRoot>,
}

impl Node {
    fn new() -> Node {
        let plugin = keel_bin().with_file_name("keel-cni");
        assert!(
            plugin.is_file(),
            "{} is missing: run `cargo build -p keel-cni` first",
            plugin.display()
        );
        let node = Node {
            child: None,
            cgroup: Some(CgroupGuard::new().unwrap()),
            netns: Some(NetnsGuard::new().unwrap()),
            state: Some(StateRoot::new().unwrap()),
        };
        let tar = node.root().join("busybox.tar");
        build_cached(Variant::Single, MediaTypes::Oci)
            .unwrap()
            .write_oci_archive(&tar, IMAGE)
            .unwrap();
        node.keel_ok(&["image", "import", tar.to_str().unwrap()]);
        node.install_cni("10.203.0.0/24");
        node
    }

    fn root(&self) -> &Path {
        self.state.as_ref().unwrap().path()
    }
    fn conf_dir(&self) -> PathBuf {
        self.root().join("cni/net.d")
    }
    fn bin_dir(&self) -> PathBuf {
        self.root().join("cni/bin")
    }
    fn socket(&self) -> PathBuf {
        self.root().join("keel.sock")
    }
    fn run_dir(&self) -> PathBuf {
        self.root().join("run/containers")
    }
    fn netns_path(&self) -> PathBuf {
        self.netns.as_ref().unwrap().path()
    }
    fn log(&self) -> PathBuf {
        self.root().join("keel-cri.log")
    }

    fn keel(&self, args: &[&str]) -> std::process::Output {
        Command::new(keel_bin())
            .arg("--root")
            .arg(self.root())
            .args(args)
            .env_remove("KEEL_CONFIG")
            .env("KEEL_RUN_DIR", self.run_dir())
            .output()
            .unwrap()
    }

    fn keel_ok(&self, args: &[&str]) -> String {
        let out = self.keel(args);
        assert!(
            out.status.success(),
            "keel {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn install_cni(&self, subnet: &str) {
        std::fs::create_dir_all(self.conf_dir()).unwrap();
        self.keel_ok(&[
            "cni",
            "install",
            "--bin-dir",
            self.bin_dir().to_str().unwrap(),
            "--conf-dir",
            self.conf_dir().to_str().unwrap(),
            "--network",
            "keelstream",
            "--bridge",
            "kbr0",
            "--subnet",
            subnet,
            "--no-masquerade",
        ]);
        let file = std::fs::read_dir(self.conf_dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "conflist"))
            .expect("keel cni install wrote a conflist");
        let mut list: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        list["plugins"][0]["ipam"]["dataDir"] =
            serde_json::json!(self.root().join("ipam").to_str().unwrap());
        std::fs::write(&file, list.to_string()).unwrap();
    }

    async fn start(&mut self) -> Client {
        let log = std::fs::File::create(self.log()).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns_path().display()))
            .arg("--")
            .arg(keel_bin())
            .arg("--root")
            .arg(self.root())
            .args(["--log", "keel_cri=debug,info", "cri", "--socket"])
            .arg(self.socket())
            .arg("--cni-conf-dir")
            .arg(self.conf_dir())
            .arg("--cni-bin-dir")
            .arg(self.bin_dir())
            .args(["--metrics-address", ""])
            .args(["--stream-address", "127.0.0.1:0"])
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--cgroup-parent")
            .arg(self.cgroup.as_ref().unwrap().name())
            .env_remove("KEEL_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = keel_cri::client::connect(&self.socket()).await {
                return keel_cri::client::clients(channel).0;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("keel cri exited with {status}:\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "keel cri did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keel cri log:\n{}", self.log_text());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let ids = self.keel(&["pod", "ls", "-q"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.keel(&["pod", "rm", "-f", id]);
        }
        let ids = self.keel(&["ctr", "ls", "-a", "-q"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.keel(&["ctr", "rm", "-f", id]);
        }
        let parent = self.cgroup.as_ref().unwrap().name().to_owned();
        drop(self.cgroup.take());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for l in mounts.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2") {
                keel_testkit::cgroup::remove_tree(&Path::new(f[1]).join(&parent));
            }
        }
        drop(self.netns.take());
        drop(self.state.take());
    }
}

fn pod_config(name: &str, log_dir: &Path) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_dir.join(name).to_str().unwrap().into(),
        ..Default::default()
    }
}

fn ctr_config(name: &str, cmd: &[&str]) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}/0.log"),
        ..Default::default()
    }
}

async fn run_container(rt: &mut Client, pod: &str, name: &str, cmd: &[&str]) -> String {
    create_and_start(rt, pod, ctr_config(name, cmd)).await
}

async fn create_and_start(rt: &mut Client, pod: &str, config: api::ContainerConfig) -> String {
    let id = rt
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: None,
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    rt.start_container(api::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();
    id
}

/// Opens a TCP connection to `addr` from inside the namespace at `netns` (a thread enters it
/// and ends; the socket stays in the namespace it was made in).
async fn tcp_in(netns: &Path, addr: String) -> tokio::net::TcpStream {
    let netns = netns.to_owned();
    let conn = std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).unwrap();
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&ns),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        let conn = std::net::TcpStream::connect(&addr).unwrap();
        conn.set_nonblocking(true).unwrap();
        conn
    })
    .join()
    .unwrap();
    tokio::net::TcpStream::from_std(conn).unwrap()
}

/// Upgrades to a WebSocket at `url` offering `protocol`; Err carries the HTTP refusal.
async fn ws_connect(netns: &Path, url: &str, protocol: &str) -> Result<Ws, WsError> {
    let ws_url = url.replacen("http://", "ws://", 1);
    let host = ws_url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned();
    let mut req = ws_url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let tcp = tcp_in(netns, host).await;
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await?;
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some(protocol)
    );
    Ok(ws)
}

/// Reads messages until the server closes: the data per channel.
async fn read_all(ws: &mut Ws) -> std::collections::BTreeMap<u8, Vec<u8>> {
    let mut out = std::collections::BTreeMap::<u8, Vec<u8>>::new();
    let read = async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Binary(d)) if !d.is_empty() => {
                    out.entry(d[0]).or_default().extend_from_slice(&d[1..]);
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the exec stream ended within 30 s");
    out
}

fn status_of(out: &std::collections::BTreeMap<u8, Vec<u8>>) -> serde_json::Value {
    serde_json::from_slice(out.get(&3).expect("a status on channel 3")).unwrap()
}

fn assert_refused(r: Result<Ws, WsError>, code: u16) {
    match r {
        Err(WsError::Http(resp)) => assert_eq!(resp.status().as_u16(), code),
        Err(e) => panic!("want HTTP {code}, got {e}"),
        Ok(_) => panic!("want HTTP {code}, got a WebSocket"),
    }
}

async fn exec_url(rt: &mut Client, id: &str, cmd: &[&str], stdin: bool) -> String {
    rt.exec(api::ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty: false,
        stdin,
        stdout: true,
        stderr: true,
    })
    .await
    .unwrap()
    .into_inner()
    .url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_attach_and_port_forward_over_the_streaming_server() {
    if !privileged("exec_attach_and_port_forward_over_the_streaming_server") {
        return;
    }
    let mut node = Node::new();
    let mut rt = node.start().await;
    let netns = node.netns_path();
    let logs = node.root().join("logs");
    let pod = rt
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(pod_config("stream", &logs)),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let sleeper = run_container(&mut rt, &pod, "sleeper", &["sleep", "3600"]).await;
    let _web = run_container(
        &mut rt,
        &pod,
        "web",
        &["httpd", "-f", "-p", "8080", "-h", "/var/www"],
    )
    .await;

    // exec cat with stdin (v5: stdin is closed with a CLOSE message), output and status 0.
    let url = exec_url(&mut rt, &sleeper, &["cat"], true).await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let mut ws = ws_connect(&netns, &url, "v5.channel.k8s.io").await.unwrap();
    let input = b"hello through the streaming server\n".repeat(100);
    for chunk in input.chunks(1000) {
        let mut m = vec![0u8];
        m.extend_from_slice(chunk);
        ws.send(Message::binary(m)).await.unwrap();
    }
    ws.send(Message::binary(vec![255u8, 0])).await.unwrap();
    let out = read_all(&mut ws).await;
    assert_eq!(out.get(&1).map(Vec::as_slice), Some(&input[..]));
    assert_eq!(status_of(&out)["status"], "Success", "{out:?}");

    // The token was single-use; a made-up one is unknown too.
    assert_refused(ws_connect(&netns, &url, "v5.channel.k8s.io").await, 404);
    let bogus = format!("{}/exec/bogus", url.rsplitn(3, '/').nth(2).unwrap());
    assert_refused(ws_connect(&netns, &bogus, "v4.channel.k8s.io").await, 404);

    // A non-zero exit is a Failure with the ExitCode cause (v4), stderr on channel 2.
    let url = exec_url(
        &mut rt,
        &sleeper,
        &["sh", "-c", "echo oops >&2; exit 3"],
        false,
    )
    .await;
    let mut ws = ws_connect(&netns, &url, "v4.channel.k8s.io").await.unwrap();
    let out = read_all(&mut ws).await;
    assert_eq!(out.get(&2).map(Vec::as_slice), Some(&b"oops\n"[..]));
    let status = status_of(&out);
    assert_eq!(status["status"], "Failure", "{status}");
    assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "3");

    // A tty: the shell runs on a terminal of its own (stdout and stderr merged on channel 1),
    // sized by resize messages on channel 4.
    let url = rt
        .exec(api::ExecRequest {
            container_id: sleeper.clone(),
            cmd: vec!["sh".into()],
            tty: true,
            stdin: true,
            stdout: true,
            stderr: false,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let mut ws = ws_connect(&netns, &url, "v5.channel.k8s.io").await.unwrap();
    let mut resize = vec![4u8];
    resize.extend_from_slice(br#"{"Width":120,"Height":33}"#);
    ws.send(Message::binary(resize)).await.unwrap();
    let mut cmd = vec![0u8];
    cmd.extend_from_slice(b"tty; stty size; echo o$((0))ops >&2; echo sum=$((40+2)); exit\n");
    ws.send(Message::binary(cmd)).await.unwrap();
    let out = read_all(&mut ws).await;
    let text = String::from_utf8_lossy(out.get(&1).map(Vec::as_slice).unwrap_or_default());
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(text.contains("33 120"), "{text:?}");
    assert!(
        text.contains("o0ops") && text.contains("sum=42"),
        "{text:?}"
    );
    assert!(!out.contains_key(&2), "{out:?}");
    assert_eq!(status_of(&out)["status"], "Success", "{out:?}");
    // tty with stderr is refused at the RPC (the CRI spec); so is attach with stdin (keel
    // keeps no container stdin).
    let e = rt
        .exec(api::ExecRequest {
            container_id: sleeper.clone(),
            cmd: vec!["sh".into()],
            tty: true,
            stdin: true,
            stdout: true,
            stderr: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), keel_cri::tonic::Code::InvalidArgument, "{e:?}");
    let attach = |container_id: String, stdin: bool| api::AttachRequest {
        container_id,
        stdin,
        tty: false,
        stdout: true,
        stderr: true,
    };
    let e = rt.attach(attach(sleeper.clone(), true)).await.unwrap_err();
    assert_eq!(e.code(), keel_cri::tonic::Code::FailedPrecondition, "{e:?}");

    // A container created with stdin (stdin_once): attach writes it live; closing it (v5
    // CLOSE) ends the container's input, the container exits.
    let mut cfg = ctr_config("upper", &["sh", "-c", "tr a-z A-Z; echo bye >&2"]);
    cfg.stdin = true;
    cfg.stdin_once = true;
    let upper = create_and_start(&mut rt, &pod, cfg).await;
    let url = rt
        .attach(attach(upper.clone(), true))
        .await
        .unwrap()
        .into_inner()
        .url;
    let mut ws = ws_connect(&netns, &url, "v5.channel.k8s.io").await.unwrap();
    let mut m = vec![0u8];
    m.extend_from_slice(b"attached stdin\n");
    ws.send(Message::binary(m)).await.unwrap();
    ws.send(Message::binary(vec![255u8, 0])).await.unwrap();
    let out = read_all(&mut ws).await;
    assert_eq!(
        out.get(&1).map(Vec::as_slice),
        Some(&b"ATTACHED STDIN\n"[..]),
        "{out:?}"
    );
    assert_eq!(
        out.get(&2).map(Vec::as_slice),
        Some(&b"bye\n"[..]),
        "{out:?}"
    );
    assert_eq!(status_of(&out)["status"], "Success", "{out:?}");

    // Attach for output: what the container writes from now on, by stream, until it exits.
    let talker = run_container(
        &mut rt,
        &pod,
        "talker",
        &[
            "sh",
            "-c",
            "sleep 2; echo out1; echo err1 >&2; sleep 1; echo out2",
        ],
    )
    .await;
    let url = rt
        .attach(attach(talker.clone(), false))
        .await
        .unwrap()
        .into_inner()
        .url;
    assert!(url.contains("/attach/"), "{url}");
    let mut ws = ws_connect(&netns, &url, "v5.channel.k8s.io").await.unwrap();
    let out = read_all(&mut ws).await;
    assert_eq!(
        out.get(&1).map(Vec::as_slice),
        Some(&b"out1\nout2\n"[..]),
        "{out:?}"
    );
    assert_eq!(
        out.get(&2).map(Vec::as_slice),
        Some(&b"err1\n"[..]),
        "{out:?}"
    );
    assert_eq!(status_of(&out)["status"], "Success", "{out:?}");

    // Port-forward to httpd on the pod's loopback: the port on both channels first, then
    // the HTTP answer on the data channel. httpd may still be starting: retry a little.
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let url = rt
            .port_forward(api::PortForwardRequest {
                pod_sandbox_id: pod.clone(),
                port: vec![8080],
            })
            .await
            .unwrap()
            .into_inner()
            .url;
        assert!(url.contains("/portforward/"), "{url}");
        let mut ws = ws_connect(&netns, &format!("{url}?port=8080"), "v4.channel.k8s.io")
            .await
            .unwrap();
        let mut data = Vec::new();
        let mut error = Vec::new();
        let mut sent = false;
        let read = async {
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Binary(d) = msg else { continue };
                match d[0] {
                    0 => data.extend_from_slice(&d[1..]),
                    1 => error.extend_from_slice(&d[1..]),
                    _ => {}
                }
                if !sent && data.len() >= 2 && error.len() >= 2 {
                    assert_eq!(&data[..2], &8080u16.to_le_bytes());
                    assert_eq!(&error[..2], &8080u16.to_le_bytes());
                    let mut m = vec![0u8];
                    m.extend_from_slice(b"GET /index.html HTTP/1.0\r\n\r\n");
                    ws.send(Message::binary(m)).await.unwrap();
                    sent = true;
                }
                if error.len() > 2 || String::from_utf8_lossy(&data).contains("</html>") {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
        let _ = ws.close(None).await;
        if error.len() <= 2 && !data.is_empty() {
            break String::from_utf8_lossy(&data[2..]).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "port-forward failed: {}",
            String::from_utf8_lossy(&error)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(answer.starts_with("HTTP/1."), "{answer}");
    assert!(
        answer.contains(single_expect::INDEX_HTML_CONTENT.trim()),
        "{answer}"
    );

    // A port nothing listens on: the error channel says so.
    let url = rt
        .port_forward(api::PortForwardRequest {
            pod_sandbox_id: pod.clone(),
            port: vec![8081],
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let mut ws = ws_connect(&netns, &url, "v4.channel.k8s.io").await.unwrap();
    let mut error = Vec::new();
    let read = async {
        while let Some(Ok(msg)) = ws.next().await {
            if let Message::Binary(d) = msg
                && d.first() == Some(&1)
            {
                error.extend_from_slice(&d[1..]);
                if error.len() > 2 {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    let text = String::from_utf8_lossy(&error[2..]).into_owned();
    assert!(text.contains("8081"), "{text}");

    spdy_exec_attach_and_port_forward(&mut rt, &netns, &pod, &sleeper).await;
}

/// A minimal SPDY/3.1 client of the streaming server, as kubelet's proxy and crictl speak
/// it: the HTTP upgrade, then client-opened streams.
struct Spdy {
    rd: tokio::io::ReadHalf<tokio::net::TcpStream>,
    wr: tokio::io::WriteHalf<tokio::net::TcpStream>,
    headers_out: spdy::HeaderWriter,
    headers_in: spdy::HeaderReader,
}

/// What came back on each stream, and which streams the server closed.
#[derive(Default, Debug)]
struct SpdyOut {
    data: std::collections::BTreeMap<u32, Vec<u8>>,
    fin: std::collections::BTreeSet<u32>,
    replies: std::collections::BTreeSet<u32>,
    goaway: bool,
}

impl Spdy {
    /// Upgrades `url` to SPDY offering `protocol`; Err is the HTTP status line when refused.
    async fn connect(netns: &Path, url: &str, protocol: &str) -> Result<Spdy, String> {
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_at(rest.find('/').unwrap());
        let mut tcp = tcp_in(netns, host.to_owned()).await;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            tcp.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        if !head.starts_with("http/1.1 101") {
            return Err(head.lines().next().unwrap_or("").to_owned());
        }
        assert!(head.contains("upgrade: spdy/3.1"), "{head}");
        assert!(
            head.contains(&format!("x-stream-protocol-version: {protocol}")),
            "{head}"
        );
        let (rd, wr) = tokio::io::split(tcp);
        Ok(Spdy {
            rd,
            wr,
            headers_out: spdy::HeaderWriter::new(),
            headers_in: spdy::HeaderReader::new(),
        })
    }

    async fn open(&mut self, id: u32, headers: &[(&str, &str)]) {
        let f = spdy::syn_stream(&mut self.headers_out, id, false, headers);
        self.wr.write_all(&f).await.unwrap();
    }

    async fn send(&mut self, id: u32, data: &[u8], fin: bool) {
        self.wr
            .write_all(&spdy::data_frame(id, fin, data))
            .await
            .unwrap();
    }

    /// Reads frames until `done` says so, the server goes away, or 30 s pass.
    async fn read(&mut self, out: &mut SpdyOut, done: impl Fn(&SpdyOut) -> bool) {
        let read = async {
            while !done(out) && !out.goaway {
                match spdy::read_frame(&mut self.rd, &mut self.headers_in).await {
                    Ok(spdy::Frame::Data { stream, fin, data }) => {
                        out.data.entry(stream).or_default().extend_from_slice(&data);
                        if fin {
                            out.fin.insert(stream);
                        }
                    }
                    Ok(spdy::Frame::SynReply { stream, .. }) => {
                        out.replies.insert(stream);
                    }
                    Ok(spdy::Frame::GoAway) | Err(_) => out.goaway = true,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("the SPDY exchange ended within 30 s");
    }
}

async fn spdy_exec_attach_and_port_forward(
    rt: &mut Client,
    netns: &Path,
    pod: &str,
    sleeper: &str,
) {
    let exec = |tty: bool, cmd: &[&str]| api::ExecRequest {
        container_id: sleeper.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin: true,
        stdout: true,
        stderr: !tty,
    };
    // Exec with stdin: streams error, stdin, stdout, stderr; stdin's FIN closes cat's input.
    let url = rt
        .exec(exec(false, &["sh", "-c", "cat; echo e >&2; exit 2"]))
        .await
        .unwrap()
        .into_inner()
        .url;
    // A protocol the server does not speak is refused before the token is used.
    let refused = Spdy::connect(netns, &url, "v1.channel.k8s.io").await.err();
    assert!(refused.is_some_and(|l| l.contains("403")));
    let mut c = Spdy::connect(netns, &url, "v4.channel.k8s.io")
        .await
        .unwrap();
    for (id, kind) in [(1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")] {
        c.open(id, &[("streamType", kind)]).await;
    }
    c.send(3, b"over spdy\n", true).await;
    let mut out = SpdyOut::default();
    c.read(&mut out, |_| false).await;
    assert_eq!(out.replies.len(), 4, "{out:?}");
    assert_eq!(
        out.data.get(&5).map(Vec::as_slice),
        Some(&b"over spdy\n"[..])
    );
    assert_eq!(out.data.get(&7).map(Vec::as_slice), Some(&b"e\n"[..]));
    let status: serde_json::Value = serde_json::from_slice(&out.data[&1]).unwrap();
    assert_eq!(status["details"]["causes"][0]["message"], "2", "{status}");
    assert!(out.fin.contains(&5) && out.fin.contains(&1), "{out:?}");

    // On a tty: the resize stream's JSON sizes the terminal.
    let url = rt.exec(exec(true, &["sh"])).await.unwrap().into_inner().url;
    let mut c = Spdy::connect(netns, &url, "v4.channel.k8s.io")
        .await
        .unwrap();
    for (id, kind) in [(1, "error"), (3, "stdin"), (5, "stdout"), (7, "resize")] {
        c.open(id, &[("streamType", kind)]).await;
    }
    c.send(7, br#"{"Width":77,"Height":21}"#, false).await;
    // The resize is applied before the shell reads its first line (a short pause: the two
    // streams are independent).
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(3, b"stty size; exit 0\n", false).await;
    let mut out = SpdyOut::default();
    c.read(&mut out, |_| false).await;
    let text = String::from_utf8_lossy(out.data.get(&5).map(Vec::as_slice).unwrap_or_default())
        .into_owned();
    assert!(text.contains("21 77"), "{text:?}");
    let status: serde_json::Value = serde_json::from_slice(&out.data[&1]).unwrap();
    assert_eq!(status["status"], "Success", "{status}");

    // Attach (output only): what the container writes from now on, then its status.
    let talker = run_container(
        rt,
        pod,
        "spdy-talker",
        &["sh", "-c", "sleep 2; echo spdy-out; echo spdy-err >&2"],
    )
    .await;
    let url = rt
        .attach(api::AttachRequest {
            container_id: talker,
            stdin: false,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let mut c = Spdy::connect(netns, &url, "v4.channel.k8s.io")
        .await
        .unwrap();
    for (id, kind) in [(1, "error"), (3, "stdout"), (5, "stderr")] {
        c.open(id, &[("streamType", kind)]).await;
    }
    let mut out = SpdyOut::default();
    c.read(&mut out, |_| false).await;
    assert_eq!(
        out.data.get(&3).map(Vec::as_slice),
        Some(&b"spdy-out\n"[..]),
        "{out:?}"
    );
    assert_eq!(
        out.data.get(&5).map(Vec::as_slice),
        Some(&b"spdy-err\n"[..]),
        "{out:?}"
    );
    let status: serde_json::Value = serde_json::from_slice(&out.data[&1]).unwrap();
    assert_eq!(status["status"], "Success", "{status}");

    // Attach to a container on a terminal: stdin, stdout and resize streams.
    let mut cfg = ctr_config("spdy-tty", &["sh"]);
    cfg.stdin = true;
    cfg.tty = true;
    let on_tty = create_and_start(rt, pod, cfg).await;
    let url = rt
        .attach(api::AttachRequest {
            container_id: on_tty,
            stdin: true,
            tty: true,
            stdout: true,
            stderr: false,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let mut c = Spdy::connect(netns, &url, "v4.channel.k8s.io")
        .await
        .unwrap();
    for (id, kind) in [(1, "error"), (3, "stdin"), (5, "stdout"), (7, "resize")] {
        c.open(id, &[("streamType", kind)]).await;
    }
    c.send(7, br#"{"Width":66,"Height":22}"#, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(3, b"stty size; exit\n", false).await;
    let mut out = SpdyOut::default();
    c.read(&mut out, |_| false).await;
    let text = String::from_utf8_lossy(out.data.get(&5).map(Vec::as_slice).unwrap_or_default())
        .into_owned();
    assert!(text.contains("22 66"), "{text:?}");

    // Port-forward: an error and a data stream per connection, named by port and requestID.
    let url = rt
        .port_forward(api::PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![8080],
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let mut c = Spdy::connect(netns, &url, "portforward.k8s.io")
        .await
        .unwrap();
    let names = |kind: &'static str, port: &'static str, id: &'static str| {
        [("streamType", kind), ("port", port), ("requestID", id)]
    };
    c.open(1, &names("error", "8080", "0")).await;
    c.open(3, &names("data", "8080", "0")).await;
    c.send(3, b"GET /index.html HTTP/1.0\r\n\r\n", false).await;
    c.open(5, &names("error", "8081", "1")).await;
    c.open(7, &names("data", "8081", "1")).await;
    let mut out = SpdyOut::default();
    c.read(&mut out, |o| o.fin.contains(&3) && o.fin.contains(&5))
        .await;
    let answer = String::from_utf8_lossy(&out.data[&3]).into_owned();
    assert!(answer.starts_with("HTTP/1."), "{answer}");
    assert!(
        answer.contains(single_expect::INDEX_HTML_CONTENT.trim()),
        "{answer}"
    );
    assert!(!out.data.contains_key(&1), "{out:?}");
    let error = String::from_utf8_lossy(&out.data[&5]).into_owned();
    assert!(error.contains("8081"), "{error}");
}
