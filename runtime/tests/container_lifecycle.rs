//! Privileged container tests: logs, exit codes, OOM, cgroup limits, seccomp, capabilities,
//! read-only rootfs, users, exec-sync and stats, each through the real runtime (libcontainer,
//! overlayfs, cgroups, the monitor process).

mod container_common;

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use container_common::Env;
use keel_runtime::container::{ExecIo, Resources, SeccompProfile, Status, resize_terminal};

fn main() -> std::process::ExitCode {
    container_common::main(&[
        (
            "run_writes_cri_log_and_exit_code",
            run_writes_cri_log_and_exit_code,
        ),
        ("oom_kill_is_recorded", oom_kill_is_recorded),
        (
            "device_cgroup_allows_only_the_default_devices",
            device_cgroup_allows_only_the_default_devices,
        ),
        (
            "limits_are_in_the_cgroup_and_update",
            limits_are_in_the_cgroup_and_update,
        ),
        (
            "default_seccomp_blocks_unshare",
            default_seccomp_blocks_unshare,
        ),
        (
            "dropped_capability_is_missing",
            dropped_capability_is_missing,
        ),
        (
            "compiled_filter_leaves_exactly_the_container_capabilities",
            compiled_filter_leaves_exactly_the_container_capabilities,
        ),
        (
            "readonly_rootfs_refuses_writes",
            readonly_rootfs_refuses_writes,
        ),
        (
            "user_names_resolve_from_image",
            user_names_resolve_from_image,
        ),
        (
            "exec_sync_output_code_and_timeout",
            exec_sync_output_code_and_timeout,
        ),
        ("log_reopens_after_rotation", log_reopens_after_rotation),
        (
            "exec_on_a_terminal_with_stdin_and_resize",
            exec_on_a_terminal_with_stdin_and_resize,
        ),
        ("exec_with_piped_stdin", exec_with_piped_stdin),
        (
            "attach_writes_stdin_and_reads_output",
            attach_writes_stdin_and_reads_output,
        ),
        (
            "attach_to_a_terminal_container_sizes_it",
            attach_to_a_terminal_container_sizes_it,
        ),
        (
            "unread_stdin_does_not_stop_the_output",
            unread_stdin_does_not_stop_the_output,
        ),
    ])
}

fn run_writes_cri_log_and_exit_code() -> anyhow::Result<()> {
    let env = Env::new()?;
    let long = "x".repeat(20_000);
    let cfg = env.sh(&format!("echo hello; echo oops >&2; echo {long}; exit 3"));
    let (exit, lines, id) = env.run_to_exit(&cfg)?;
    ensure!(exit.exit_code == 3, "exit code {exit:?}");
    ensure!(!exit.oom_killed);
    let rec = env.rt.status(&id)?;
    ensure!(rec.status == Status::Exited);
    ensure!(
        lines.first().map(String::as_str) == Some("hello"),
        "{lines:?}"
    );
    let raw = std::fs::read_to_string(&rec.record.log_path)?;
    let raw_lines: Vec<&str> = raw.lines().collect();
    // <RFC3339Nano> <stream> <F|P> <msg>
    let first: Vec<&str> = raw_lines[0].splitn(4, ' ').collect();
    ensure!(
        first[0].ends_with('Z') && first[0].contains('T'),
        "{raw_lines:?}"
    );
    ensure!(chrono::DateTime::parse_from_rfc3339(first[0]).is_ok());
    ensure!(first[1..] == ["stdout", "F", "hello"], "{first:?}");
    ensure!(raw.contains(" stderr F oops\n"), "{raw}");
    // 20000 bytes: one 16 KiB P part then the F rest
    let long_parts: Vec<&&str> = raw_lines.iter().filter(|l| l.contains("xxxx")).collect();
    ensure!(long_parts.len() == 2, "{}", long_parts.len());
    ensure!(long_parts[0].contains(" stdout P "));
    ensure!(long_parts[1].contains(" stdout F "));
    Ok(())
}

fn oom_kill_is_recorded() -> anyhow::Result<()> {
    let env = Env::new()?;
    let mut cfg = env.sh("dd if=/dev/zero of=/dev/null bs=64M count=1; echo survived");
    cfg.resources.memory_limit = Some(16 << 20);
    let (exit, lines, _) = env.run_to_exit(&cfg)?;
    ensure!(
        exit.oom_killed,
        "not reported OOM-killed: {exit:?} {lines:?}"
    );
    Ok(())
}

fn read_trim(p: std::path::PathBuf) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(&p)
        .with_context(|| format!("read {}", p.display()))?
        .trim()
        .to_string())
}

fn limits_are_in_the_cgroup_and_update() -> anyhow::Result<()> {
    let env = Env::new()?;
    let mut cfg = env.sh("sleep 300");
    cfg.resources = Resources {
        memory_limit: Some(32 << 20),
        pids_limit: Some(50),
        cpu_shares: Some(512),
        cpu_quota: Some(50_000),
        cpu_period: Some(100_000),
        ..Default::default()
    };
    let id = env.run(&cfg)?;
    let v2 = keel_runtime::container::cgroups::is_v2();
    let dir = |c: &str| env.cgroup_dir(c, &id).context("no cgroup dir");
    if v2 {
        ensure!(read_trim(dir("memory")?.join("memory.max"))? == (32 << 20).to_string());
        ensure!(read_trim(dir("pids")?.join("pids.max"))? == "50");
        ensure!(read_trim(dir("cpu")?.join("cpu.max"))? == "50000 100000");
    } else {
        ensure!(read_trim(dir("memory")?.join("memory.limit_in_bytes"))? == (32 << 20).to_string());
        ensure!(read_trim(dir("pids")?.join("pids.max"))? == "50");
        ensure!(read_trim(dir("cpu")?.join("cpu.shares"))? == "512");
        ensure!(read_trim(dir("cpu")?.join("cpu.cfs_quota_us"))? == "50000");
    }
    let new = Resources {
        memory_limit: Some(64 << 20),
        ..cfg.resources.clone()
    };
    env.rt.update(&id, &new)?;
    let mem_file = if v2 {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    ensure!(read_trim(dir("memory")?.join(mem_file))? == (64 << 20).to_string());
    ensure!(env.rt.status(&id)?.record.config.resources.memory_limit == Some(64 << 20));

    let stats = env.rt.stats(&id)?;
    ensure!(stats.usage.pids >= 1, "{stats:?}");
    ensure!(stats.usage.memory_working_set_bytes > 0, "{stats:?}");

    // The monitor stays small.
    let run: serde_json::Value = serde_json::from_slice(&std::fs::read(
        env.rt.container_dir(&id).join("state.json"),
    )?)?;
    let mpid = run["monitor"]["pid"].as_i64().context("monitor pid")?;
    let status = std::fs::read_to_string(format!("/proc/{mpid}/status"))?;
    let rss: Vec<&str> = status
        .lines()
        .filter(|l| l.starts_with("Rss") || l.starts_with("VmRSS"))
        .collect();
    eprintln!("monitor {mpid} {rss:?}");
    Ok(())
}

/// Deny-all plus the default allow list (which libcgroups appends): /dev/zero and /dev/null
/// open, a block device node the container may create (CAP_MKNOD, `b *:* m`) does not.
fn device_cgroup_allows_only_the_default_devices() -> anyhow::Result<()> {
    let env = Env::new()?;
    let (exit, lines, _) = env.run_to_exit(&env.sh(
        "head -c 3 /dev/zero | wc -c; echo x > /dev/null && echo null=ok; \
         mknod /tmp/loop0 b 7 0 && echo mknod=ok; head -c 1 /tmp/loop0; echo open=$?",
    ))?;
    ensure!(
        exit.exit_code == 0
            && lines.first().map(|l| l.trim()) == Some("3")
            && lines.iter().any(|l| l == "null=ok")
            && lines.iter().any(|l| l == "mknod=ok")
            && lines
                .iter()
                .any(|l| l.starts_with("open=") && l != "open=0"),
        "{exit:?} {lines:?}"
    );
    if !keel_runtime::container::cgroups::is_v2() {
        let id = env.run(&env.sh("sleep 300"))?;
        let list = read_trim(
            env.cgroup_dir("devices", &id)
                .context("no devices cgroup")?
                .join("devices.list"),
        )?;
        env.rt.stop(&id, Duration::from_secs(1))?;
        let mut rules: Vec<&str> = list.lines().collect();
        rules.sort_unstable();
        let mut want = vec![
            "b *:* m",
            "c *:* m",
            "c 1:3 rwm",
            "c 1:5 rwm",
            "c 1:7 rwm",
            "c 1:8 rwm",
            "c 1:9 rwm",
            "c 5:0 rwm",
            "c 5:1 rwm",
            "c 5:2 rwm",
            "c 10:200 rwm",
            "c 136:* rwm",
        ];
        want.sort_unstable();
        ensure!(rules == want, "devices.list: {rules:?}");
    }
    Ok(())
}

fn default_seccomp_blocks_unshare() -> anyhow::Result<()> {
    let env = Env::new()?;
    let cfg = env.sh("unshare -n true; echo net=$?; unshare -U true; echo user=$?");
    let (_, lines, _) = env.run_to_exit(&cfg)?;
    ensure!(lines.len() == 2 && lines[0] != "net=0", "{lines:?}");
    // user namespaces need no capability: only seccomp stops them.
    ensure!(lines[1] != "user=0", "{lines:?}");
    let mut cfg = env.sh("unshare -U true; echo user=$?");
    cfg.security.seccomp = SeccompProfile::Unconfined;
    let (_, unconfined, _) = env.run_to_exit(&cfg)?;
    // ... and without the filter the same call works: it was the profile that refused it.
    ensure!(unconfined == ["user=0"], "{unconfined:?}");
    Ok(())
}

fn cap_eff(lines: &[String]) -> anyhow::Result<u64> {
    let l = lines
        .iter()
        .find(|l| l.starts_with("CapEff:"))
        .context("no CapEff line")?;
    Ok(u64::from_str_radix(
        l.trim_start_matches("CapEff:").trim(),
        16,
    )?)
}

fn dropped_capability_is_missing() -> anyhow::Result<()> {
    const CHOWN: u64 = 1 << 0;
    const NET_RAW: u64 = 1 << 13;
    const SYS_ADMIN: u64 = 1 << 21;
    let env = Env::new()?;
    let (_, lines, _) = env.run_to_exit(&env.sh("grep Cap /proc/self/status"))?;
    let default = cap_eff(&lines)?;
    ensure!(default & NET_RAW != 0 && default & CHOWN != 0 && default & SYS_ADMIN == 0);
    let mut cfg = env.sh("grep Cap /proc/self/status");
    cfg.security.cap_drop = vec!["NET_RAW".into()];
    cfg.security.cap_add = vec!["CAP_SYS_ADMIN".into()];
    let (_, lines, _) = env.run_to_exit(&cfg)?;
    let caps = cap_eff(&lines)?;
    ensure!(caps & NET_RAW == 0, "NET_RAW still there: {caps:x}");
    ensure!(caps & SYS_ADMIN != 0 && caps & CHOWN != 0, "{caps:x}");
    Ok(())
}

/// A `/proc/self/status` field (`CapEff`, `Seccomp`, ...) as a number (hex for Cap* fields).
fn status_field(lines: &[String], name: &str) -> anyhow::Result<u64> {
    let value = lines
        .iter()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .with_context(|| format!("no {name} line in {lines:?}"))?
        .trim();
    let radix = if name.starts_with("Cap") { 16 } else { 10 };
    Ok(u64::from_str_radix(value, radix)?)
}

/// The runtime compiles the seccomp profile once and the init loads it; without
/// no_new_privs the spec lends the init CAP_SYS_ADMIN (and CAP_SETPCAP) for that. The
/// container, and a process exec'd into it, must end with the filter and exactly its own
/// capability sets, with and without no_new_privs, also when CAP_SETPCAP is dropped.
fn compiled_filter_leaves_exactly_the_container_capabilities() -> anyhow::Result<()> {
    // containerd's default set: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
    // NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP.
    const DEFAULT: u64 = (1 << 0)
        | (1 << 1)
        | (1 << 3)
        | (1 << 4)
        | (1 << 5)
        | (1 << 6)
        | (1 << 7)
        | (1 << 8)
        | (1 << 10)
        | (1 << 13)
        | (1 << 18)
        | (1 << 27)
        | (1 << 29)
        | (1 << 31);
    const SETPCAP: u64 = 1 << 8;
    let env = Env::new()?;
    let show =
        "grep -E '^(Cap|Seccomp:|NoNewPrivs:)' /proc/self/status; unshare -U true; echo user=$?";
    let check = |lines: &[String], want: u64, nnp: u64, what: &str| -> anyhow::Result<()> {
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            let got = status_field(lines, set)?;
            ensure!(
                got == want,
                "{what}: {set} {got:x}, want {want:x}: {lines:?}"
            );
        }
        ensure!(status_field(lines, "CapInh")? == 0, "{what}: {lines:?}");
        ensure!(status_field(lines, "CapAmb")? == 0, "{what}: {lines:?}");
        ensure!(
            status_field(lines, "Seccomp")? == 2,
            "{what}: no filter: {lines:?}"
        );
        ensure!(
            status_field(lines, "NoNewPrivs")? == nnp,
            "{what}: {lines:?}"
        );
        ensure!(
            lines.last().is_some_and(|l| l != "user=0"),
            "{what}: unshare -U worked: {lines:?}"
        );
        Ok(())
    };
    let (_, lines, _) = env.run_to_exit(&env.sh(show))?;
    check(&lines, DEFAULT, 0, "default")?;

    let mut cfg = env.sh(show);
    cfg.security.cap_drop = vec!["SETPCAP".into()];
    let (_, lines, _) = env.run_to_exit(&cfg)?;
    check(&lines, DEFAULT & !SETPCAP, 0, "without SETPCAP")?;

    let mut cfg = env.sh(show);
    cfg.security.no_new_privs = true;
    let (_, lines, _) = env.run_to_exit(&cfg)?;
    check(&lines, DEFAULT, 1, "no_new_privs")?;

    let id = env.run(&env.sh("sleep 300"))?;
    let cmd = vec!["sh".to_string(), "-c".to_string(), show.to_string()];
    let r = env.rt.exec_sync(&id, &cmd, Some(Duration::from_secs(20)))?;
    let lines: Vec<String> = String::from_utf8_lossy(&r.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    check(&lines, DEFAULT, 0, "exec")?;
    Ok(())
}

fn readonly_rootfs_refuses_writes() -> anyhow::Result<()> {
    let env = Env::new()?;
    let mut cfg = env.sh("touch /newfile; echo root=$?; touch /dev/shm/x; echo shm=$?");
    cfg.security.readonly_rootfs = true;
    let (_, lines, _) = env.run_to_exit(&cfg)?;
    ensure!(
        lines.len() == 2 && lines[0] != "root=0" && lines[1] == "shm=0",
        "{lines:?}"
    );
    let (_, lines, _) = env.run_to_exit(&env.sh("touch /newfile; echo root=$?"))?;
    ensure!(lines == ["root=0"], "{lines:?}");
    Ok(())
}

fn user_names_resolve_from_image() -> anyhow::Result<()> {
    let env = Env::new()?;
    let mut cfg = env.sh("id -u; id -g; id -G; echo $HOME");
    cfg.user = Some("keel".into());
    let (_, lines, _) = env.run_to_exit(&cfg)?;
    ensure!(lines[0] == "1000" && lines[1] == "1000", "{lines:?}");
    ensure!(lines[2].split(' ').any(|g| g == "2000"), "{lines:?}");
    ensure!(lines[3] == "/home/keel", "{lines:?}");
    cfg.user = Some("ghost".into());
    ensure!(env.rt.create(&cfg, &env.image).is_err());
    Ok(())
}

fn exec_sync_output_code_and_timeout() -> anyhow::Result<()> {
    let env = Env::new()?;
    let id = env.run(&env.sh("sleep 300"))?;
    let cmd = |s: &str| vec!["sh".to_string(), "-c".to_string(), s.to_string()];
    let r = env.rt.exec_sync(
        &id,
        &cmd("echo out; echo err >&2; exit 7"),
        Some(Duration::from_secs(10)),
    )?;
    ensure!(r.exit_code == 7 && !r.timed_out, "{r:?}");
    ensure!(r.stdout == b"out\n" && r.stderr == b"err\n", "{r:?}");
    let start = Instant::now();
    let r = env
        .rt
        .exec_sync(&id, &cmd("sleep 30"), Some(Duration::from_secs(1)))?;
    ensure!(r.timed_out, "{r:?}");
    ensure!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    ensure!(env.rt.status(&id)?.status == Status::Running);
    Ok(())
}

fn log_reopens_after_rotation() -> anyhow::Result<()> {
    let env = Env::new()?;
    let id = env.run(&env.sh("echo first; sleep 2; echo second; sleep 300"))?;
    let log = env.rt.status(&id)?.record.log_path;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("first")
    {
        ensure!(Instant::now() < deadline, "no first line");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated)?;
    env.rt.reopen_log(&id)?;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("second")
    {
        ensure!(
            Instant::now() < deadline,
            "second line not in the reopened log"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(!std::fs::read_to_string(&rotated)?.contains("second"));
    Ok(())
}

/// Reads `master` until `want` appears in what came out (or 10 s pass); answers all of it.
fn read_until(master: &mut std::fs::File, want: &str) -> anyhow::Result<String> {
    use std::io::Read;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&out).contains(want) {
        ensure!(
            Instant::now() < deadline,
            "no {want:?} in {:?}",
            String::from_utf8_lossy(&out)
        );
        let mut pfd = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(master),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(200u16))? == 0 {
            continue;
        }
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    ensure!(text.contains(want), "no {want:?} in {text:?}");
    Ok(text)
}

fn exec_on_a_terminal_with_stdin_and_resize() -> anyhow::Result<()> {
    use std::io::Write;
    let env = Env::new()?;
    let id = env.run(&env.sh("sleep 300"))?;
    let io = ExecIo {
        stdin: true,
        tty: true,
    };
    let mut p = env.rt.exec_stream(&id, &["sh".to_string()], io)?;
    let mut master = std::fs::File::from(p.pty.take().context("no terminal")?);
    resize_terminal(&master, 100, 40)?;
    // The shell's terminal is its controlling one in the container's own devpts; the size
    // set on the master is what the shell sees; its stdout and stderr both come out here.
    master.write_all(b"tty; stty size; echo $TERM; echo e$((1))rr >&2; echo done=$((6*7))\n")?;
    let text = read_until(&mut master, "done=42")?;
    ensure!(text.contains("/dev/pts/"), "{text:?}");
    ensure!(text.contains("40 100"), "{text:?}");
    ensure!(text.contains("xterm"), "{text:?}");
    ensure!(text.contains("e1rr"), "{text:?}");
    resize_terminal(&master, 132, 50)?;
    master.write_all(b"stty size; exit 5\n")?;
    read_until(&mut master, "50 132")?;
    let code = p.wait()?;
    ensure!(code == 5, "exit code {code}");
    ensure!(env.rt.status(&id)?.status == Status::Running);
    Ok(())
}

fn exec_with_piped_stdin() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let env = Env::new()?;
    let id = env.run(&env.sh("sleep 300"))?;
    let io = ExecIo {
        stdin: true,
        tty: false,
    };
    let cmd = [
        "sh".to_string(),
        "-c".to_string(),
        "tr a-z A-Z; exit 3".to_string(),
    ];
    let mut p = env.rt.exec_stream(&id, &cmd, io)?;
    ensure!(p.pty.is_none());
    let mut stdin = p.stdin.take().context("no stdin")?;
    stdin.write_all(b"hello keel\n")?;
    drop(stdin);
    let mut out = String::new();
    p.stdout
        .take()
        .context("no stdout")?
        .read_to_string(&mut out)?;
    ensure!(out == "HELLO KEEL\n", "{out:?}");
    ensure!(p.wait()? == 3);
    Ok(())
}

/// Reads attach frames from `sock` until the output (both streams) contains `want`.
fn attached_until(
    sock: &mut std::os::unix::net::UnixStream,
    seen: &mut String,
    want: &str,
) -> anyhow::Result<()> {
    use keel_runtime::container::container_attach::take_frames;
    use std::io::Read;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !seen.contains(want) {
        let n = sock
            .read(&mut chunk)
            .with_context(|| format!("no {want:?} in {seen:?}"))?;
        ensure!(n > 0, "attach closed without {want:?}: {seen:?}");
        buf.extend_from_slice(&chunk[..n]);
        for (_, data) in take_frames(&mut buf).map_err(anyhow::Error::msg)? {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    Ok(())
}

fn attach_writes_stdin_and_reads_output() -> anyhow::Result<()> {
    use keel_runtime::container::container_attach::{CLOSE_STDIN, STDIN, frame};
    use std::io::Write;
    let env = Env::new()?;
    let mut cfg = env.sh("echo ready; tr a-z A-Z; echo done >&2");
    cfg.stdin = true;
    let id = env.run(&cfg)?;
    let mut sock = env.rt.attach(&id)?;
    let mut seen = String::new();
    sock.write_all(&frame(STDIN, b"through attach\n"))?;
    attached_until(&mut sock, &mut seen, "THROUGH ATTACH")?;
    sock.write_all(&frame(CLOSE_STDIN, b""))?;
    attached_until(&mut sock, &mut seen, "done")?;
    let exit = env
        .rt
        .wait(&id, Some(Duration::from_secs(10)))?
        .context("no exit")?;
    ensure!(exit.exit_code == 0, "{exit:?}");
    // The log has it all the same.
    let log = std::fs::read_to_string(env.rt.status(&id)?.record.log_path)?;
    ensure!(log.contains("THROUGH ATTACH"), "{log}");
    // Without stdin or tty there is nothing to attach to.
    let plain = env.run(&env.sh("sleep 30"))?;
    ensure!(env.rt.attach(&plain).is_err());
    Ok(())
}

/// A container that never reads its stdin while a client pushes a MiB into it: the monitor
/// holds the client back (its socket fills) and keeps logging the container's output.
fn unread_stdin_does_not_stop_the_output() -> anyhow::Result<()> {
    use keel_runtime::container::container_attach::{STDIN, frame};
    use std::io::Write;
    let env = Env::new()?;
    let mut cfg = env.sh("i=0; while true; do i=$((i+1)); echo tick$i; sleep 0.05; done");
    cfg.stdin = true;
    let id = env.run(&cfg)?;
    let sock = env.rt.attach(&id)?;
    let mut writer = sock.try_clone()?;
    writer.set_write_timeout(Some(Duration::from_secs(10)))?;
    let pusher = std::thread::spawn(move || {
        let chunk = frame(STDIN, &[b'x'; 16 * 1024]);
        (0..64)
            .take_while(|_| writer.write_all(&chunk).is_ok())
            .count()
    });
    let ticks = || -> anyhow::Result<usize> {
        let log = std::fs::read_to_string(env.rt.status(&id)?.record.log_path)?;
        Ok(log.lines().filter(|l| l.contains(" tick")).count())
    };
    // By now the pipe (64 KiB) and the monitor's pending input are full.
    std::thread::sleep(Duration::from_millis(1500));
    let before = ticks()?;
    std::thread::sleep(Duration::from_millis(1000));
    let after = ticks()?;
    env.rt.stop(&id, Duration::from_secs(1))?;
    drop(sock);
    let pushed = pusher
        .join()
        .map_err(|_| anyhow::anyhow!("pusher panicked"))?;
    ensure!(
        after >= before + 5,
        "the log stopped while stdin was full: {before} ticks, a second later {after} \
         ({pushed} chunks of 16 KiB pushed)"
    );
    Ok(())
}

fn attach_to_a_terminal_container_sizes_it() -> anyhow::Result<()> {
    use keel_runtime::container::container_attach::{RESIZE, STDIN, frame, size};
    use std::io::Write;
    let env = Env::new()?;
    let mut cfg = env.sh("");
    cfg.command = vec!["sh".into()];
    cfg.stdin = true;
    cfg.tty = true;
    let id = env.run(&cfg)?;
    let mut sock = env.rt.attach(&id)?;
    sock.write_all(&frame(RESIZE, &size(90, 30)))?;
    sock.write_all(&frame(STDIN, b"tty; stty size; echo $TERM; exit 3\n"))?;
    let mut seen = String::new();
    // `xterm` is the last line the shell prints (the echoed command line says `$TERM`).
    attached_until(&mut sock, &mut seen, "xterm")?;
    let exit = env
        .rt
        .wait(&id, Some(Duration::from_secs(10)))?
        .context("no exit")?;
    ensure!(exit.exit_code == 3, "{exit:?}: {seen:?}");
    ensure!(
        seen.contains("/dev/pts/") && seen.contains("30 90"),
        "{seen:?}"
    );
    Ok(())
}
