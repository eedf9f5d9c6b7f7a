//! End-to-end tests of `keel ctr ...`: the built binary creates containers whose monitor is
//! the same binary re-executed. Privileged (root): overlay mounts, cgroups, namespaces.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keel_testkit::image_builder::{MediaTypes, Variant, build_cached};
use keel_testkit::{CgroupGuard, StateRoot, privileged};

const IMAGE: &str = "example.com/keel/busybox:v1";

/// A state root with the busybox image imported, a cgroup parent, and cleanup of every
/// container on drop (also when the test fails).
struct Cli {
    cgroup: Option<CgroupGuard>,
    state: Option<StateRoot>,
}

impl Cli {
    fn new() -> Cli {
        let state = StateRoot::new().unwrap();
        let tar = state.path().join("busybox.tar");
        build_cached(Variant::Single, MediaTypes::Oci)
            .unwrap()
            .write_oci_archive(&tar, IMAGE)
            .unwrap();
        let cli = Cli {
            cgroup: Some(CgroupGuard::new().unwrap()),
            state: Some(state),
        };
        let out = cli.keel(&["image", "import", tar.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        cli
    }

    fn root(&self) -> &Path {
        self.state.as_ref().unwrap().path()
    }

    fn parent(&self) -> String {
        self.cgroup.as_ref().unwrap().name().to_string()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_keel"));
        c.arg("--root")
            .arg(self.root())
            .args(args)
            .env_remove("KEEL_CONFIG")
            .env("KEEL_RUN_DIR", self.root().join("run"));
        c
    }

    fn keel(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.keel(args);
        assert!(
            out.status.success(),
            "keel {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let ids = self.keel(&["ctr", "ls", "-a", "-q"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.keel(&["ctr", "rm", "-f", id]);
        }
        let parent = self.parent();
        drop(self.cgroup.take());
        for root in cgroup_roots() {
            keel_testkit::cgroup::remove_tree(&root.join(&parent));
        }
        drop(self.state.take());
    }
}

fn cgroup_roots() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

#[test]
fn run_rm_prints_output_and_exits_with_code() {
    if !privileged("run_rm_prints_output_and_exits_with_code") {
        return;
    }
    let cli = Cli::new();
    let parent = cli.parent();
    let out = cli.keel(&[
        "ctr",
        "run",
        "--rm",
        "--cgroup-parent",
        &parent,
        IMAGE,
        "sh",
        "-c",
        "echo hello; echo oops >&2; exit 4",
    ]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("oops"));
    // --rm: nothing left
    assert_eq!(cli.ok(&["ctr", "ls", "-a", "-q"]), "");
    assert!(keel_testkit::state::mounts_under(cli.root()).is_empty());
    // The plain form the issue names (default cgroup parent) works too.
    let out = cli.keel(&["ctr", "run", "--rm", IMAGE, "echo", "plain"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "plain\n");
}

#[test]
fn detached_lifecycle_through_the_cli() {
    if !privileged("detached_lifecycle_through_the_cli") {
        return;
    }
    let cli = Cli::new();
    let parent = cli.parent();
    let id = cli.ok(&[
        "ctr",
        "run",
        "-d",
        "--name",
        "web",
        "--cgroup-parent",
        &parent,
        "--label",
        "app=web",
        "--memory",
        "64m",
        IMAGE,
        "sh",
        "-c",
        "echo started; sleep 300",
    ]);
    let id = id.trim();
    assert_eq!(id.len(), 64);
    let ls = cli.ok(&["ctr", "ls", "--filter", "label=app=web"]);
    assert!(ls.contains("running") && ls.contains("web"), "{ls}");
    assert_eq!(cli.ok(&["ctr", "exec", "web", "echo", "hi"]), "hi\n");
    let out = cli.keel(&["ctr", "exec", "web", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    interactive_shell(&cli, "web");
    // -i alone: stdin is a pipe into the command.
    let mut child = cli
        .command(&["ctr", "exec", "-i", "web", "tr", "a-z", "A-Z"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"piped in\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PIPED IN\n");
    assert!(cli.ok(&["ctr", "stats", "web"]).contains(&id[..12]));
    let inspect: serde_json::Value =
        serde_json::from_str(&cli.ok(&["ctr", "inspect", "web"])).unwrap();
    assert_eq!(inspect["status"], "running");
    assert_eq!(cli.ok(&["ctr", "logs", "web"]), "started\n");
    // rm without -f refuses a running container
    assert!(!cli.keel(&["ctr", "rm", "web"]).status.success());
    cli.ok(&["ctr", "stop", "-t", "1", "web"]);
    let ls = cli.ok(&["ctr", "ls", "-a"]);
    assert!(
        ls.contains("exited (137)") || ls.contains("exited (143)"),
        "{ls}"
    );
    assert_eq!(cli.ok(&["ctr", "ls", "-q"]), "");
    cli.ok(&["ctr", "rm", "web"]);
    assert_eq!(cli.ok(&["ctr", "ls", "-a", "-q"]), "");
    for root in cgroup_roots() {
        assert!(!root.join(&parent).join(id).exists());
    }
}

/// Sets the size of the terminal behind `fd`.
fn set_size(fd: &impl std::os::fd::AsRawFd, cols: u16, rows: u16) {
    let ws = nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which lives across the call.
    assert_eq!(
        unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCSWINSZ, &ws) },
        0
    );
}

/// Reads the pty master until `want` came out (10 s at most).
fn read_until(master: &mut std::fs::File, seen: &mut String, want: &str) {
    use std::io::Read;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while !seen.contains(want) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {want:?} in {seen:?}"
        );
        let mut pfd = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(master),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(200u16)).unwrap() == 0 {
            continue;
        }
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
        }
    }
    assert!(seen.contains(want), "no {want:?} in {seen:?}");
}

/// `keel ctr exec -it NAME sh` on a pseudo-terminal of the test's, as a person at a terminal
/// runs it: the shell sees a terminal of the size of ours, follows a resize (SIGWINCH), and
/// its exit code is keel's.
fn interactive_shell(cli: &Cli, name: &str) {
    use std::io::Write;
    let pty = nix::pty::openpty(None, None).unwrap();
    set_size(&pty.slave, 90, 30);
    let slave = std::fs::File::from(pty.slave);
    let mut child = cli
        .command(&["ctr", "exec", "-it", name, "sh"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    let mut seen = String::new();
    master
        .write_all(b"tty; stty size; echo sum=$((2+3))\r")
        .unwrap();
    read_until(&mut master, &mut seen, "sum=5");
    assert!(seen.contains("/dev/pts/"), "{seen:?}");
    assert!(seen.contains("30 90"), "{seen:?}");
    set_size(&master, 120, 40);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGWINCH,
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    master.write_all(b"stty size; exit 4\r").unwrap();
    read_until(&mut master, &mut seen, "40 120");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(4), "{seen:?}");
}

/// `keel ctr run -it` on a pseudo-terminal of the test's: the container's shell runs on a
/// terminal of its own, of our size; `-i` alone pipes stdin; `keel ctr attach` joins a running
/// one.
#[test]
fn interactive_run_and_attach() {
    use std::io::Write;
    if !privileged("interactive_run_and_attach") {
        return;
    }
    let cli = Cli::new();
    let parent = cli.parent();
    let pty = nix::pty::openpty(None, None).unwrap();
    set_size(&pty.slave, 100, 35);
    let slave = std::fs::File::from(pty.slave);
    let mut child = cli
        .command(&[
            "ctr",
            "run",
            "--rm",
            "-it",
            "--cgroup-parent",
            &parent,
            IMAGE,
            "sh",
        ])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    let mut seen = String::new();
    master
        .write_all(b"tty; stty size; echo n=$((3*3)); exit 6\r")
        .unwrap();
    read_until(&mut master, &mut seen, "n=9");
    assert!(
        seen.contains("/dev/pts/") && seen.contains("35 100"),
        "{seen:?}"
    );
    assert_eq!(child.wait().unwrap().code(), Some(6), "{seen:?}");
    // What the terminal got after the shell: the person sees no library chatter (libcgroups
    // warns about every v1 controller this host lacks, on each removal). Every end of the
    // terminal is closed now, so the read ends (EIO) once the buffer is drained.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut master, &mut rest);
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains("WARN"), "{rest:?}");

    // -i without -t: a pipe.
    let mut child = cli
        .command(&[
            "ctr",
            "run",
            "--rm",
            "-i",
            "--cgroup-parent",
            &parent,
            IMAGE,
            "tr",
            "a-z",
            "A-Z",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"run with stdin\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "RUN WITH STDIN\n");
    assert_eq!(out.status.code(), Some(0));

    // attach to a detached -i container: our stdin becomes its stdin; its EOF ends it.
    cli.ok(&[
        "ctr",
        "run",
        "-d",
        "-i",
        "--name",
        "cat",
        "--cgroup-parent",
        &parent,
        IMAGE,
        "sh",
        "-c",
        "cat; echo cat-done",
    ]);
    let mut child = cli
        .command(&["ctr", "attach", "cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"attached later\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "attached later\ncat-done\n"
    );
    cli.ok(&["ctr", "rm", "-f", "cat"]);
    // Attaching to a container without stdin or tty says why.
    cli.ok(&[
        "ctr",
        "run",
        "-d",
        "--name",
        "plain",
        "--cgroup-parent",
        &parent,
        IMAGE,
        "sleep",
        "30",
    ]);
    let out = cli.keel(&["ctr", "attach", "plain"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("without stdin or tty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cli.ok(&["ctr", "rm", "-f", "plain"]);
}
