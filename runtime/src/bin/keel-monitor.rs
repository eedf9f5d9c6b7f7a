//! `keel-monitor`: the small binary a container's monitor becomes once the container is
//! created (`keel __monitor` creates it with libcontainer, then execs this with the init's
//! pid and its pipes). Same process, so the pid, the children and the subreaper role stay;
//! only the watch loop's pages are resident for the container's life.
//!
//! It must not do anything else: every other role lives in the `keel` binary.

use keel_runtime::container::monitor::{WATCH_ARG, watch_main};

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.split_first() {
        Some((role, rest)) if role == WATCH_ARG => watch_main(rest),
        _ => {
            eprintln!("keel-monitor: started by keel's container monitor only ({WATCH_ARG} ...)");
            2
        }
    };
    std::process::ExitCode::from(code.clamp(0, 255) as u8)
}
