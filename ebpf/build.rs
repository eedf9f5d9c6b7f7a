//! Compiles the eBPF C programs under c/ with clang (`-target bpf -O2 -g`) into OUT_DIR, and
//! builds and runs a host probe that prints the C map layouts for the layout test.
//!
//! Fails the build with a message naming what is missing (clang, libbpf headers, kernel headers)
//! rather than producing an object that cannot load.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Entry files, one per attach point; each becomes OUT_DIR/<name>.o.
const PROGRAMS: &[&str] = &["sock", "tc_nodeport", "xdp_nodeport", "bench_trafficgen"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let csrc = manifest.join("c");
    println!("cargo:rerun-if-changed={}", csrc.display());
    println!("cargo:rerun-if-env-changed=CLANG");
    let clang = find_clang();
    if !Path::new("/usr/include/bpf/bpf_helpers.h").exists() {
        panic!(
            "keel-ebpf: /usr/include/bpf/bpf_helpers.h missing: install libbpf-dev (`cargo xtask setup`)"
        );
    }
    let mut includes = vec![format!("-I{}", csrc.display())];
    // <linux/types.h> pulls <asm/types.h>, which Debian keeps in the multiarch include dir.
    for dir in multiarch_dirs() {
        if dir.join("asm/types.h").exists() {
            includes.push(format!("-I{}", dir.display()));
            break;
        }
    }
    for prog in PROGRAMS {
        let src = csrc.join(format!("{prog}.c"));
        let obj = out.join(format!("{prog}.o"));
        run(Command::new(&clang)
            .args(["-target", "bpf", "-O2", "-g", "-Wall", "-Werror"])
            .args(&includes)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj));
    }
    let probe = out.join("layout_probe");
    run(Command::new(&clang)
        .args(["-O0", "-Wall", "-Werror"])
        .args(&includes)
        .arg(csrc.join("layout_probe.c"))
        .arg("-o")
        .arg(&probe));
    let printed = Command::new(&probe)
        .output()
        .unwrap_or_else(|e| panic!("keel-ebpf: run {}: {e}", probe.display()));
    if !printed.status.success() {
        panic!("keel-ebpf: {} failed: {}", probe.display(), printed.status);
    }
    std::fs::write(out.join("layout_c.rs"), printed.stdout)
        .unwrap_or_else(|e| panic!("keel-ebpf: write layout_c.rs: {e}"));
}

fn find_clang() -> String {
    let candidates: Vec<String> = std::env::var("CLANG")
        .into_iter()
        .chain(["clang-19", "clang"].map(String::from))
        .collect();
    for c in &candidates {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.clone();
        }
    }
    panic!(
        "keel-ebpf: no clang found (tried {}): install clang (`cargo xtask setup`) or set CLANG",
        candidates.join(", ")
    );
}

fn multiarch_dirs() -> Vec<PathBuf> {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let triple = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "riscv64" => "riscv64-linux-gnu",
        "powerpc64" => "powerpc64le-linux-gnu",
        "s390x" => "s390x-linux-gnu",
        _ => "",
    };
    vec![
        PathBuf::from("/usr/include").join(triple),
        PathBuf::from("/usr/include"),
    ]
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("keel-ebpf: spawn {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "keel-ebpf: {cmd:?} failed ({}):\n{}{}\n(missing headers? install clang, libbpf-dev and linux-libc-dev: `cargo xtask setup`)",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
