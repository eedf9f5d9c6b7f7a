//! The forwarding-rate instruments of bench proxy (4): a kernel-side traffic generator (keel-ebpf's
//! `keel_bench_gen`, run by BPF_PROG_TEST_RUN in live-frames mode, which transmits the frames it
//! redirects) and a counting sink on the backend's veth (`keel_bench_sink` on tc ingress, after
//! the backend's receive path, or `keel_bench_sink_xdp` in native XDP, as the frame arrives),
//! plus the frame they agree on.
//!
//! Owns only what it creates: the generator is never attached, the sink's link (tcx or XDP) is
//! dropped with the [`Sink`] (and goes with the backend's veth if the namespace goes first). Written by
//! hand because no crate drives BPF_F_TEST_XDP_LIVE_FRAMES (aya's loader has no test-run call);
//! the bpf_attr layout is the one proxy/tests/support/prog_test.rs uses, plus the live-frames
//! fields.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aya::maps::PerCpuArray;
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use keel_ebpf::bench;
use keel_testkit::bpf_test_run::{BPF_F_TEST_XDP_LIVE_FRAMES, TestRunAttr, csum, pseudo, test_run};
use keel_testkit::netns::in_netns;

/// Frames per bpf_xdp_do_flush in a live test run: NAPI's budget, a driver's batch.
const GEN_BATCH: u32 = 64;
/// Frames per test-run call; the generator loops calls until its window is over.
const GEN_CHUNK: u32 = 1 << 16;

/// `struct xdp_md`, the context a live test run starts from.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// An Ethernet + IPv4 + UDP frame `src_mac` -> `dst_mac`, `src` -> `dst`, with `payload` bytes
/// of payload and complete checksums (as off a NIC; keel's XDP program updates them
/// incrementally and needs them complete).
pub(super) fn udp_frame(
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
    payload: usize,
) -> Vec<u8> {
    let udp_len = 8 + payload;
    let mut p = vec![0x6bu8; 14 + 20 + udp_len];
    p[0..6].copy_from_slice(&dst_mac);
    p[6..12].copy_from_slice(&src_mac);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut p[14..34];
    ip.fill(0);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = libc::IPPROTO_UDP as u8;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = csum(&p[14..34], 0);
    p[24..26].copy_from_slice(&c.to_be_bytes());
    p[34..36].copy_from_slice(&sport.to_be_bytes());
    p[36..38].copy_from_slice(&dport.to_be_bytes());
    p[38..40].copy_from_slice(&(udp_len as u16).to_be_bytes());
    p[40..42].fill(0);
    let c = match csum(&p[34..], pseudo(&p)) {
        0 => 0xffff,
        c => c,
    };
    p[40..42].copy_from_slice(&c.to_be_bytes());
    p
}

/// An interface's ifindex and MAC address in the namespace `ns` (sysfs as `ip netns exec` mounts
/// it for that namespace).
pub(super) fn link_info(
    ns: &keel_testkit::NetnsGuard,
    dev: &str,
) -> anyhow::Result<(u32, [u8; 6])> {
    let ifindex: u32 = ns
        .exec("cat", &[&format!("/sys/class/net/{dev}/ifindex")])?
        .trim()
        .parse()
        .with_context(|| format!("ifindex of {dev}"))?;
    let text = ns.exec("cat", &[&format!("/sys/class/net/{dev}/address")])?;
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for b in &mut mac {
        let part = parts
            .next()
            .with_context(|| format!("MAC of {dev}: {text}"))?;
        *b = u8::from_str_radix(part, 16).with_context(|| format!("MAC of {dev}: {text}"))?;
    }
    Ok((ifindex, mac))
}

/// The generator loaded for one client: `frame` (its first GEN_HDR_LEN bytes rewritten on every
/// run, the source port rotated over `flows` ports) transmitted out of `ifindex` in the netns
/// `ns`, as if received there.
pub(super) struct Generator {
    ebpf: Ebpf,
    ns: PathBuf,
    ifindex: u32,
    frame: Vec<u8>,
}

impl Generator {
    pub(super) fn load(
        ns: &Path,
        ifindex: u32,
        frame: Vec<u8>,
        flows: u32,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(flows.is_power_of_two(), "flows {flows}: not a power of two");
        let hdr: [u8; bench::GEN_HDR_LEN] = frame
            .get(..bench::GEN_HDR_LEN)
            .and_then(|h| h.try_into().ok())
            .context("frame shorter than its headers")?;
        let mut ebpf = EbpfLoader::new()
            .override_global(bench::GEN_IFINDEX, &ifindex, true)
            .override_global(bench::GEN_FLOWS, &flows, true)
            .override_global(bench::GEN_HDR, &hdr, true)
            .load(bench::OBJECT)
            .context("load the bench generator")?;
        let prog: &mut Xdp = ebpf
            .program_mut(bench::GEN_PROGRAM)
            .context("no generator program")?
            .try_into()?;
        prog.load().context("load keel_bench_gen")?;
        Ok(Generator {
            ebpf,
            ns: ns.to_owned(),
            ifindex,
            frame,
        })
    }

    /// Generates frames for `dur` (in whole test-run calls); returns how many, and the time it
    /// took.
    pub(super) fn run_for(&self, dur: Duration) -> anyhow::Result<(u64, Duration)> {
        let prog: &Xdp = self
            .ebpf
            .program(bench::GEN_PROGRAM)
            .context("no generator program")?
            .try_into()?;
        // The fd stays open: `self` (and the Ebpf owning it) outlives the thread, which is
        // joined before this returns.
        let fd = prog.fd()?.as_fd().as_raw_fd();
        let (ifindex, frame) = (self.ifindex, self.frame.clone());
        in_netns(&self.ns, move || -> anyhow::Result<(u64, Duration)> {
            let start = Instant::now();
            let mut frames = 0u64;
            while start.elapsed() < dur {
                live_run(fd, &frame, ifindex, GEN_CHUNK)?;
                frames += u64::from(GEN_CHUNK);
            }
            Ok((frames, start.elapsed()))
        })?
    }
}

/// One live-frames test run of `repeat` frames "received" on `ifindex` (of the calling thread's
/// namespace).
fn live_run(prog_fd: i32, frame: &[u8], ifindex: u32, repeat: u32) -> anyhow::Result<()> {
    let ctx = XdpMd {
        data_end: frame.len() as u32,
        ingress_ifindex: ifindex,
        ..Default::default()
    };
    let mut attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
        ctx_in: (&raw const ctx) as u64,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        batch_size: GEN_BATCH,
        ..Default::default()
    };
    // SAFETY: data_in and ctx_in point to live buffers of the sizes given, which outlive the
    // call; live mode writes no output.
    if let Err(e) = unsafe { test_run(&mut attr) } {
        bail!("BPF_PROG_TEST_RUN (live frames, ifindex {ifindex}): {e}");
    }
    Ok(())
}

/// Where a sink counts (and drops) the frames reaching the backend's veth.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum SinkAt {
    /// tc ingress: after the backend's receive path (an skb built, GRO, checksum).
    Tc,
    /// Native XDP: as the frame arrives, before anything is built for it.
    Xdp,
}

/// The sink on `dev` in a backend's namespace, counting what reached `dst`.
pub(super) struct Sink {
    ebpf: Ebpf,
}

/// What a sink counted (totals since it was attached).
#[derive(Clone, Copy, Default)]
pub(super) struct SinkCount {
    /// IPv4 UDP to the expected address and port, checksums valid.
    pub delivered: u64,
    /// Any other IPv4 packet.
    pub other: u64,
}

impl Sink {
    pub(super) fn attach(
        ns: &Path,
        dev: &str,
        (addr, port): (Ipv4Addr, u16),
        at: SinkAt,
    ) -> anyhow::Result<Self> {
        let dev = dev.to_owned();
        let ebpf = in_netns(ns, move || -> anyhow::Result<Ebpf> {
            // Network byte order in the program's globals: the bytes as on the wire.
            let be_addr = u32::from_ne_bytes(addr.octets());
            let be_port = u16::from_ne_bytes(port.to_be_bytes());
            let mut ebpf = EbpfLoader::new()
                .override_global(bench::SINK_ADDR, &be_addr, true)
                .override_global(bench::SINK_PORT, &be_port, true)
                .load(bench::OBJECT)
                .context("load the bench sink")?;
            match at {
                SinkAt::Tc => {
                    let prog: &mut SchedClassifier = ebpf
                        .program_mut(bench::SINK_PROGRAM)
                        .context("no sink program")?
                        .try_into()?;
                    prog.load().context("load keel_bench_sink")?;
                    prog.attach(&dev, TcAttachType::Ingress)
                        .with_context(|| format!("attach the bench sink to {dev}'s tc ingress"))?;
                }
                SinkAt::Xdp => {
                    let prog: &mut Xdp = ebpf
                        .program_mut(bench::SINK_XDP_PROGRAM)
                        .context("no XDP sink program")?
                        .try_into()?;
                    prog.load().context("load keel_bench_sink_xdp")?;
                    prog.attach(&dev, XdpMode::Driver).with_context(|| {
                        format!("attach the bench XDP sink to {dev} (native mode)")
                    })?;
                }
            }
            Ok(ebpf)
        })??;
        Ok(Sink { ebpf })
    }

    pub(super) fn count(&self) -> anyhow::Result<SinkCount> {
        let map = PerCpuArray::<_, u64>::try_from(
            self.ebpf
                .map(bench::SINK_COUNT_MAP)
                .context("no sink counter map")?,
        )?;
        let sum = |i: u32| -> anyhow::Result<u64> { Ok(map.get(&i, 0)?.iter().sum()) };
        Ok(SinkCount {
            delivered: sum(bench::SINK_DELIVERED)?,
            other: sum(bench::SINK_OTHER)?,
        })
    }
}

/// Whether an Ethernet + IPv4 + UDP frame's checksums are valid (for the test of `udp_frame`).
#[cfg(test)]
fn checksums_valid(p: &[u8]) -> bool {
    csum(&p[14..34], 0) == 0 && csum(&p[34..], pseudo(p)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_has_complete_checksums_and_the_bench_sizes() {
        let f = udp_frame(
            ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]),
            (Ipv4Addr::new(10, 88, 0, 1), 10000),
            (Ipv4Addr::new(10, 88, 0, 2), 30053),
            bench::UDP_LEN - 8,
        );
        assert_eq!(f.len(), 14 + 20 + bench::UDP_LEN);
        assert!(checksums_valid(&f));
    }
}
