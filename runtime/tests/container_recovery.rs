//! Privileged tests of state and recovery: a second runtime instance over the same state
//! (a daemon restart, also after SIGKILL of the first process) sees every container with the
//! right status, and removal leaves no mount, cgroup, directory or process.

mod container_common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use container_common::Env;
use keel_runtime::container::{ContainerRuntime, ListFilter, RuntimeOptions, Status};

const DAEMON_ARG: &str = "__test_daemon";

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(DAEMON_ARG) {
        return test_daemon(&args[2..]);
    }
    container_common::main(&[
        (
            "restart_sees_running_and_exited",
            restart_sees_running_and_exited,
        ),
        (
            "restart_after_sigkill_of_creator",
            restart_after_sigkill_of_creator,
        ),
        (
            "removal_leaves_nothing_behind",
            removal_leaves_nothing_behind,
        ),
    ])
}

/// A stand-in daemon: creates two containers over `<root> <run> <cgroup parent> <image id>`
/// (image already imported), prints their ids, then waits to be killed.
fn test_daemon(args: &[String]) -> std::process::ExitCode {
    let r = (|| -> anyhow::Result<()> {
        let [root, run, parent] = args else {
            anyhow::bail!("usage: {DAEMON_ARG} ROOT RUN PARENT");
        };
        let rt = ContainerRuntime::open(RuntimeOptions {
            root: PathBuf::from(root),
            run_dir: PathBuf::from(run),
            cgroup_parent: parent.clone(),
            monitor_exe: Some(std::env::current_exe()?),
        })?;
        let image = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let store =
                    keel_runtime::ImageStore::open(std::path::Path::new(root), Default::default())?;
                anyhow::Ok(
                    keel_runtime::container::ImageInfo::resolve(&store, container_common::IMAGE)
                        .await?,
                )
            })?;
        let sh = |s: &str| keel_runtime::container::ContainerConfig {
            command: vec!["sh".into(), "-c".into(), s.into()],
            ..Default::default()
        };
        let long = rt.create(&sh("sleep 300"), &image)?;
        rt.start(&long)?;
        let short = rt.create(&sh("sleep 2; exit 5"), &image)?;
        rt.start(&short)?;
        println!("{long} {short}");
        std::thread::sleep(Duration::from_secs(600));
        Ok(())
    })();
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            println!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn check_second_instance(env: &Env, long: &str, short: &str) -> anyhow::Result<()> {
    let rt2 = ContainerRuntime::open(container_common::options(
        env.state.as_ref().context("state")?,
        &env.cgroup_parent,
    ))?;
    let exit = rt2
        .wait(short, Some(Duration::from_secs(20)))?
        .context("short container did not exit")?;
    ensure!(exit.exit_code == 5, "{exit:?}");
    let running = rt2.list(&ListFilter {
        status: Some(Status::Running),
        ..Default::default()
    })?;
    ensure!(
        running.len() == 1 && running[0].record.id == long,
        "{running:?}"
    );
    let exited = rt2.list(&ListFilter {
        status: Some(Status::Exited),
        ..Default::default()
    })?;
    ensure!(exited.len() == 1 && exited[0].record.id == short);
    let exit = rt2.stop(long, Duration::from_secs(1))?;
    ensure!(exit.exit_code == 137 || exit.exit_code == 143, "{exit:?}");
    ensure!(rt2.status(long)?.status == Status::Exited);
    Ok(())
}

fn restart_sees_running_and_exited() -> anyhow::Result<()> {
    let env = Env::new()?;
    let long = env.run(&env.sh("sleep 300"))?;
    let short = env.run(&env.sh("sleep 2; exit 5"))?;
    // The first instance goes away (nothing of it is in memory any more).
    check_second_instance(&env, &long, &short)
}

fn restart_after_sigkill_of_creator() -> anyhow::Result<()> {
    let env = Env::new()?;
    let state = env.state.as_ref().context("state")?;
    let mut daemon = Command::new(std::env::current_exe()?)
        .arg(DAEMON_ARG)
        .arg(state.path())
        .arg(state.path().join("run"))
        .arg(&env.cgroup_parent)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(daemon.stdout.take().context("stdout")?).read_line(&mut line)?;
    daemon.kill()?; // SIGKILL
    daemon.wait()?;
    let ids: Vec<&str> = line.split_whitespace().collect();
    ensure!(ids.len() == 2, "daemon said {line:?}");
    check_second_instance(&env, ids[0], ids[1])
}

fn removal_leaves_nothing_behind() -> anyhow::Result<()> {
    let env = Env::new()?;
    let mut ids = Vec::new();
    let mut monitors = Vec::new();
    for i in 0..9 {
        let cfg = match i % 3 {
            0 => env.sh("sleep 300"),
            _ => env.sh("true"),
        };
        let id = env.rt.create(&cfg, &env.image)?;
        if i % 3 != 2 {
            env.rt.start(&id)?; // every third stays created
        }
        let run: serde_json::Value = serde_json::from_slice(&std::fs::read(
            env.rt.container_dir(&id).join("state.json"),
        )?)?;
        monitors.push(run["monitor"]["pid"].as_i64().context("monitor pid")?);
        ids.push(id);
    }
    for id in &ids {
        env.rt.remove(id, true)?;
    }
    let root = env.root().to_owned();
    let mounts = keel_testkit::state::mounts_under(&root);
    ensure!(mounts.is_empty(), "mounts left: {mounts:?}");
    let left: Vec<_> = std::fs::read_dir(root.join("containers"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(left.is_empty(), "state left: {left:?}");
    let run_left: Vec<_> = std::fs::read_dir(root.join("run"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(run_left.is_empty(), "run state left: {run_left:?}");
    for cg in container_common::cgroup_roots() {
        for id in &ids {
            let p = cg.join(&env.cgroup_parent).join(id);
            ensure!(!p.exists(), "cgroup left: {}", p.display());
        }
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    for id in &ids {
        ensure!(
            !info.contains(id.as_str()),
            "mount of {id} left in mountinfo"
        );
    }
    for pid in monitors {
        ensure!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .map(|c| !c.contains("__monitor"))
                    .unwrap_or(true),
            "monitor {pid} still runs"
        );
    }
    Ok(())
}
