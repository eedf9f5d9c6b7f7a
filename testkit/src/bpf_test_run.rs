//! BPF_PROG_TEST_RUN for the tests and benches that run keel's programs on crafted packets
//! (the NodePort programs' tests, bench proxy's live-frames generator), and the Internet
//! checksum those packets need. The one door to that syscall outside aya, which has none.

/// `bpf_attr.test` of BPF_PROG_TEST_RUN (linux/bpf.h).
#[repr(C)]
#[derive(Debug, Default)]
pub struct TestRunAttr {
    pub prog_fd: u32,
    pub retval: u32,
    pub data_size_in: u32,
    pub data_size_out: u32,
    pub data_in: u64,
    pub data_out: u64,
    pub repeat: u32,
    pub duration: u32,
    pub ctx_size_in: u32,
    pub ctx_size_out: u32,
    pub ctx_in: u64,
    pub ctx_out: u64,
    pub flags: u32,
    pub cpu: u32,
    pub batch_size: u32,
    pub _pad: u32,
}

/// BPF_PROG_TEST_RUN's flag that transmits XDP_TX / XDP_REDIRECT frames.
pub const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// Runs BPF_PROG_TEST_RUN with `attr` (in the calling thread's network namespace); the
/// kernel fills in `retval`, `data_size_out` and `duration`.
///
/// # Safety
/// Every pointer in `attr` (`data_in`, `data_out`, `ctx_in`, `ctx_out`) must be 0 or point to
/// a live buffer at least as long as its size field says, for the whole call.
pub unsafe fn test_run(attr: &mut TestRunAttr) -> std::io::Result<()> {
    // SAFETY: attr is a whole bpf_attr.test; the caller vouches for its buffers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One's-complement sum of `data` (odd length padded with zero) on top of `sum`, complemented:
/// a header's checksum field, or 0 when checking a header that carries one.
pub fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The IPv4 pseudo-header sum (addresses, protocol, L4 length) of an Ethernet + IPv4 frame
/// without IP options whose L4 segment runs to the end of `frame`: the `sum` to give [`csum`]
/// over the segment.
pub fn pseudo(frame: &[u8]) -> u32 {
    let ip = &frame[14..34];
    let l4_len = frame.len() - 34;
    let mut s = 0u32;
    for c in ip[12..20].chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    s + u32::from(ip[9]) + l4_len as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_is_the_kernel_layout_and_csum_checks_out() {
        // linux/bpf.h: the test member of bpf_attr ends with batch_size at offset 76.
        assert_eq!(std::mem::size_of::<TestRunAttr>(), 80);
        // RFC 1071's example header checksums to 0 once its checksum is in.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(csum(&hdr, 0), 0);
        let mut zeroed = hdr;
        zeroed[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(csum(&zeroed, 0), 0xb861);
    }
}
