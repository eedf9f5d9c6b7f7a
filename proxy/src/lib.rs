//! keel-proxy: loads and attaches keel-ebpf's programs with aya, pins them in bpffs, and syncs
//! Services and EndpointSlices into the BPF maps.
//!
//! Filled by the eBPF service proxy issue.
