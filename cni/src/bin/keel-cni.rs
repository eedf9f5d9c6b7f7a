//! The `keel-cni` executable: a CNI runtime execs it with `CNI_*` in the environment and the
//! network config on stdin. All logic lives in `keel_cni::plugin`; the one thing done here is
//! finishing a DEL's veth deletion in a detached child once the answer is out (see
//! `keel_cni::pending`), because only the executable knows it is single-threaded and about to exit.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => keel_cni::plugin::execute(|k| std::env::var(k).ok(), &stdin),
        Err(e) => keel_cni::plugin::stdin_failure(e),
    };
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    drop(out);
    if let Some(pending) = outcome.pending {
        finish_detached(pending);
    }
    std::process::exit(outcome.exit_code);
}

/// Finishes `pending` in a child that outlives us, with no tie to the runtime: its own session
/// and no inherited stdio, so the runtime's read of our stdout ends when we exit. If the fork
/// fails, the work is done here before exiting.
fn finish_detached(pending: keel_cni::pending::PendingDelete) {
    // SAFETY: the process is single-threaded here (the plugin's only threads are scoped
    // namespace helpers, joined before any verb returns), so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    match pid {
        0 => {
            detach_stdio();
            // A failure here has no one to tell: GC reclaims what is left, as after a kill.
            let _ = pending.finish();
            // SAFETY: ends the child without running the parent's exit handlers twice.
            unsafe { libc::_exit(0) }
        }
        -1 => {
            let _ = pending.finish();
        }
        // The parent exits; the child keeps the marker lock (a shared open file description).
        _ => drop(pending),
    }
}

fn detach_stdio() {
    // SAFETY: plain syscalls on our own descriptors.
    unsafe {
        libc::setsid();
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..=2 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
    }
}
