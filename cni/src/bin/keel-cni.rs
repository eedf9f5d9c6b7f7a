//! The `keel-cni` executable: a CNI runtime execs it with `CNI_*` in the environment and the
//! network config on stdin. All logic lives in `keel_cni::plugin`.

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
    std::process::exit(outcome.exit_code);
}
