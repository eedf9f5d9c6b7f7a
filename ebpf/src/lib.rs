//! keel-ebpf: the eBPF programs (C sources under ebpf/c, one file per attach point) compiled by clang
//! at build time, and the `#[repr(C)]` map key/value layouts mirrored by one C header.
//!
//! Owns the kernel-facing data layouts; loading and attaching belong to keel-proxy.
//! Filled by the eBPF service proxy issue.
