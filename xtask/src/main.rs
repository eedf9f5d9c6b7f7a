//! `cargo xtask`: Keel's developer tasks. `setup` installs the system packages the build and
//! the tests need; `test` is the one command CI runs; `bench` runs a benchmark against its
//! anchor in the same run (keel-bench, bench/); `image` builds the busybox test images; `run` builds keel and
//! starts the main job.

mod image;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Keel developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the Debian packages the build and the tests need (only those missing).
    Setup,
    /// Everything CI checks: setup, cargo fmt --check, clippy -D warnings, every test
    /// (privileged ones included: run as root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run a benchmark beside its anchor and print the ratios: builds and runs keel-bench
    /// (bench/) once the system packages are in place. `cargo xtask bench --help` lists them.
    #[command(disable_help_flag = true)]
    Bench {
        /// The benchmark's name and keel-bench's flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build test images.
    #[command(subcommand)]
    Image(ImageTask),
    /// Build keel (release) and start the main job in the foreground: `keel server`, a
    /// single-node cluster on the embedded store.
    Run {
        /// State root for the run (images, pods, containers; the server's data in ROOT/server).
        #[arg(long, default_value = "/var/lib/keel")]
        root: PathBuf,
        /// More `keel server` flags, after `--` (e.g. `-- --insecure-registry HOST:PORT`).
        #[arg(last = true)]
        server_args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ImageTask {
    /// The busybox test image, from Debian's busybox-static.
    Busybox(image::ImageArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Test { args } => test(&args),
        Task::Bench { args } => {
            setup::run()?;
            let mut cmd = vec!["run", "--quiet", "-p", "keel-bench", "--"];
            cmd.extend(args.iter().map(String::as_str));
            cargo(&cmd)
        }
        Task::Image(ImageTask::Busybox(args)) => {
            setup::run()?;
            image::run(args)
        }
        Task::Run { root, server_args } => run_main_job(&root, &server_args),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs `cargo ARGS` in the workspace root, failing if it fails.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    println!("+ cargo {}", args.join(" "));
    let mut command = Command::new(&cargo);
    command.args(args).current_dir(workspace_root());
    if std::env::var_os("CI").is_some() {
        // A CI clone is built once: incremental caches would only eat its disk.
        command.env("CARGO_INCREMENTAL", "0");
    }
    let status = command
        .status()
        .with_context(|| format!("run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    if !rustix::process::geteuid().is_root() {
        eprintln!("xtask: not root: privileged tests will print SKIP lines (CI runs as root)");
    }
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The CNI tests and the end-to-end tests exec the release-independent debug binaries,
    // which `cargo test` builds for the packages that declare them.
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    args.extend(extra.iter().map(String::as_str));
    cargo(&args)
}

fn run_main_job(root: &Path, server_args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    // keel-monitor (runtime's small watcher binary) must sit beside keel for the ~1 MiB monitor;
    // keel-cni beside it is the node's pod network plugin.
    cargo(&[
        "build",
        "--release",
        "-p",
        "keel",
        "-p",
        "keel-cni",
        "-p",
        "keel-runtime",
        "--bins",
    ])?;
    let keel = workspace_root().join("target/release/keel");
    let data_dir = root.join("server");
    println!(
        "starting a single-node cluster: `keel server` (API on https://127.0.0.1:6443, store and \
         credentials in {}, this machine as its node); it prints the kubeconfig to use, e.g.\n  \
         export KUBECONFIG={}/kubeconfig; kubectl get nodes\n\
         Images come from registries (`-- --insecure-registry HOST:PORT` for a plain-HTTP one) or \
         `{} --root {} image import FILE.tar`. Ctrl-C stops the server; pods keep running.",
        data_dir.display(),
        data_dir.display(),
        keel.display(),
        root.display()
    );
    let status = Command::new(&keel)
        .arg("--root")
        .arg(root)
        .args(["--log", "info", "server", "--data-dir"])
        .arg(&data_dir)
        .args(server_args)
        .status()
        .with_context(|| format!("start {}", keel.display()))?;
    if !status.success() {
        bail!("keel server exited with {status}");
    }
    Ok(())
}
