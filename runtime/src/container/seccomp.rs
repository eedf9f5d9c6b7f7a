//! Seccomp profiles: the runtime default (the equivalent of containerd's / moby's
//! RuntimeDefault, written here as data), Localhost profiles loaded from JSON, and the one
//! translation libcontainer needs.
//!
//! The default profile denies with EPERM everything not on an allowlist; syscalls that need a
//! capability (mount, unshare, setns, ptrace, ...) are allowed only when the container has it,
//! and `clone` may not create namespaces without CAP_SYS_ADMIN, so `unshare -n` fails in an
//! ordinary container. `clone3` answers ENOSYS so libcs fall back to the filtered `clone`.
//! It must not read anything but the Localhost file it is given.

use std::collections::HashSet;
use std::path::Path;

use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder,
    LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall, LinuxSyscallBuilder,
};

/// A profile that could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp profile {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("building the seccomp profile: {0}")]
    Build(String),
}

/// Allowed for every container, separated by whitespace.
const ALLOWED: &str = "\
    accept accept4 access adjtimex alarm bind brk cachestat capget capset chdir chmod chown \
    chown32 clock_adjtime clock_adjtime64 clock_getres clock_getres_time64 clock_gettime \
    clock_gettime64 clock_nanosleep clock_nanosleep_time64 close close_range connect \
    copy_file_range creat dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_ctl_old \
    epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2 execve execveat exit \
    exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir fchmod \
    fchmodat fchmodat2 fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr \
    flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate \
    ftruncate64 futex futex_requeue futex_time64 futex_wait futex_waitv futex_wake futimesat \
    getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32 getgid getgid32 \
    getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority \
    getrandom getresgid getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage \
    getsid getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr \
    inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy \
    io_getevents io_pgetevents io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit ipc \
    kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lchown32 \
    lgetxattr link linkat listen listxattr llistxattr _llseek lremovexattr lseek lsetxattr lstat \
    lstat64 madvise map_shadow_stack membarrier memfd_create memfd_secret mincore mkdir mkdirat \
    mknod mknodat mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify mq_open \
    mq_timedreceive mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap \
    msgctl msgget msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep \
    newfstatat _newselect open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 \
    pkey_alloc pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv preadv2 \
    prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64 pwritev pwritev2 read readahead \
    readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg remap_file_pages \
    removexattr rename renameat renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending \
    rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait \
    rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr sched_getparam \
    sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval \
    sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam \
    sched_setscheduler sched_yield seccomp select semctl semget semop semtimedop \
    semtimedop_time64 send sendfile sendfile64 sendmmsg sendmsg sendto setfsgid setfsgid32 \
    setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid setpriority \
    setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid setreuid32 \
    setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setuid32 \
    setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 sigprocmask \
    sigreturn socket socketcall socketpair splice stat stat64 statfs statfs64 statx symlink \
    symlinkat sync sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete \
    timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64 timerfd_create \
    timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times tkill truncate \
    truncate64 ugetrlimit umask uname unlink unlinkat utime utimensat utimensat_time64 utimes \
    vfork vmsplice wait4 waitid waitpid write writev";

/// x86-64 only.
const ALLOWED_AMD64: &[&str] = &["arch_prctl", "modify_ldt"];

/// Syscalls allowed only when the container holds a capability.
const BY_CAPABILITY: &[(Capability, &[&str])] = &[
    (Capability::DacReadSearch, &["open_by_handle_at"]),
    (
        Capability::SysAdmin,
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    (Capability::SysBoot, &["reboot"]),
    (Capability::SysChroot, &["chroot"]),
    (
        Capability::SysModule,
        &["delete_module", "init_module", "finit_module"],
    ),
    (Capability::SysPacct, &["acct"]),
    (
        Capability::SysPtrace,
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    (Capability::SysRawio, &["iopl", "ioperm"]),
    (
        Capability::SysTime,
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ),
    (Capability::SysTtyConfig, &["vhangup"]),
    (
        Capability::SysNice,
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ),
    (Capability::Syslog, &["syslog"]),
    (Capability::Bpf, &["bpf"]),
    (Capability::Perfmon, &["perf_event_open"]),
];

const CLONE_NEWNS: u64 = 0x0002_0000;
const CLONE_NEWCGROUP: u64 = 0x0200_0000;
const CLONE_NEWUTS: u64 = 0x0400_0000;
const CLONE_NEWIPC: u64 = 0x0800_0000;
const CLONE_NEWUSER: u64 = 0x1000_0000;
const CLONE_NEWPID: u64 = 0x2000_0000;
const CLONE_NEWNET: u64 = 0x4000_0000;
const CLONE_NAMESPACES: u64 = CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET;
const ENOSYS: u32 = 38;
const EPERM: u32 = 1;

fn rule(names: &[&str], action: LinuxSeccompAction) -> Result<LinuxSyscall, SeccompError> {
    LinuxSyscallBuilder::default()
        .names(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .action(action)
        .build()
        .map_err(|e| SeccompError::Build(e.to_string()))
}

fn arg_rule(
    name: &str,
    index: usize,
    value: u64,
    value_two: u64,
    op: LinuxSeccompOperator,
) -> Result<LinuxSyscall, SeccompError> {
    let arg = LinuxSeccompArgBuilder::default()
        .index(index)
        .value(value)
        .value_two(value_two)
        .op(op)
        .build()
        .map_err(|e| SeccompError::Build(e.to_string()))?;
    LinuxSyscallBuilder::default()
        .names(vec![name.to_string()])
        .action(LinuxSeccompAction::ScmpActAllow)
        .args(vec![arg])
        .build()
        .map_err(|e| SeccompError::Build(e.to_string()))
}

/// The RuntimeDefault profile for a container with capability set `caps` (its bounding set).
/// Argument comparisons use the OCI meaning (`value` is the mask of SCMP_CMP_MASKED_EQ).
pub fn default_profile(caps: &HashSet<Capability>) -> Result<LinuxSeccomp, SeccompError> {
    let allowed: Vec<&str> = ALLOWED.split_whitespace().collect();
    let mut syscalls = vec![rule(&allowed, LinuxSeccompAction::ScmpActAllow)?];
    if cfg!(target_arch = "x86_64") {
        syscalls.push(rule(ALLOWED_AMD64, LinuxSeccompAction::ScmpActAllow)?);
    }
    // personality(2): only the harmless domains.
    for persona in [0x0, 0x0008, 0x0002_0000, 0x0002_0008, 0xffff_ffff] {
        syscalls.push(arg_rule(
            "personality",
            0,
            persona,
            0,
            LinuxSeccompOperator::ScmpCmpEq,
        )?);
    }
    let mut extra: Vec<&str> = Vec::new();
    for (cap, names) in BY_CAPABILITY {
        if caps.contains(cap) {
            extra.extend(names.iter());
        }
    }
    extra.sort_unstable();
    extra.dedup();
    if !extra.is_empty() {
        syscalls.push(rule(&extra, LinuxSeccompAction::ScmpActAllow)?);
    }
    if !caps.contains(&Capability::SysAdmin) {
        // clone without namespace flags; clone3 cannot be filtered by flags, so ENOSYS.
        syscalls.push(arg_rule(
            "clone",
            0,
            CLONE_NAMESPACES,
            0,
            LinuxSeccompOperator::ScmpCmpMaskedEq,
        )?);
        let mut clone3 = rule(&["clone3"], LinuxSeccompAction::ScmpActErrno)?;
        clone3.set_errno_ret(Some(ENOSYS));
        syscalls.push(clone3);
    }
    let arches = if cfg!(target_arch = "x86_64") {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    } else if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchArm, Arch::ScmpArchAarch64]
    } else {
        vec![]
    };
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActErrno)
        .default_errno_ret(EPERM)
        .architectures(arches)
        .syscalls(syscalls)
        .build()
        .map_err(|e| SeccompError::Build(e.to_string()))
}

/// Parses a Localhost profile (OCI `linux.seccomp` JSON, the format runc and containerd take).
pub fn parse_profile(path: &Path, text: &str) -> Result<LinuxSeccomp, SeccompError> {
    serde_json::from_str(text).map_err(|e| SeccompError::Load {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Reads and parses a Localhost profile.
pub fn load_profile(path: &Path) -> Result<LinuxSeccomp, SeccompError> {
    let text = std::fs::read_to_string(path).map_err(|e| SeccompError::Load {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse_profile(path, &text)
}

/// libcontainer 0.7 reads SCMP_CMP_MASKED_EQ backwards from runc (it takes `valueTwo` as the
/// mask and `value` as the datum). Profiles are written with the OCI meaning, so the two are
/// swapped for those comparisons just before the spec is handed to libcontainer.
pub fn for_libcontainer(mut profile: LinuxSeccomp) -> LinuxSeccomp {
    let Some(mut syscalls) = profile.syscalls().clone() else {
        return profile;
    };
    for sc in syscalls.iter_mut() {
        let Some(mut args) = sc.args().clone() else {
            continue;
        };
        for a in args.iter_mut() {
            if a.op() == LinuxSeccompOperator::ScmpCmpMaskedEq
                && let Ok(swapped) = LinuxSeccompArgBuilder::default()
                    .index(a.index())
                    .value(a.value_two().unwrap_or(0))
                    .value_two(a.value())
                    .op(a.op())
                    .build()
            {
                *a = swapped;
            }
        }
        sc.set_args(Some(args));
    }
    profile.set_syscalls(Some(syscalls));
    profile
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(p: &LinuxSeccomp, name: &str) -> Vec<LinuxSyscall> {
        p.syscalls()
            .iter()
            .flatten()
            .filter(|s| s.names().iter().any(|n| n == name))
            .cloned()
            .collect()
    }

    fn default_caps() -> HashSet<Capability> {
        [Capability::Chown, Capability::Kill, Capability::SysChroot]
            .into_iter()
            .collect()
    }

    #[test]
    fn unshare_and_mount_need_sys_admin() {
        let p = default_profile(&default_caps()).unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        assert!(allowed(&p, "unshare").is_empty());
        assert!(allowed(&p, "mount").is_empty());
        assert_eq!(allowed(&p, "chroot").len(), 1);
        let clone = allowed(&p, "clone");
        assert_eq!(clone.len(), 1);
        let arg = &clone[0].args().as_ref().unwrap()[0];
        assert_eq!(arg.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
        assert_eq!(arg.value() & CLONE_NEWNET, CLONE_NEWNET);
        assert_eq!(allowed(&p, "clone3")[0].errno_ret(), Some(ENOSYS));

        let mut admin = default_caps();
        admin.insert(Capability::SysAdmin);
        let p = default_profile(&admin).unwrap();
        assert_eq!(allowed(&p, "unshare").len(), 1);
        let clone = allowed(&p, "clone");
        assert!(clone[0].args().is_none());
    }

    #[test]
    fn masked_eq_is_swapped_for_libcontainer() {
        let p = for_libcontainer(default_profile(&default_caps()).unwrap());
        let clone = allowed(&p, "clone");
        let arg = &clone[0].args().as_ref().unwrap()[0];
        assert_eq!(arg.value(), 0);
        assert_eq!(arg.value_two(), Some(CLONE_NAMESPACES));
        // Other operators are untouched.
        let pers = allowed(&p, "personality");
        assert_eq!(pers[1].args().as_ref().unwrap()[0].value(), 0x0008);
    }

    #[test]
    fn localhost_profiles_parse() {
        let text = r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}]}"#;
        let p = parse_profile(Path::new("p.json"), text).unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        assert!(parse_profile(Path::new("p.json"), "{").is_err());
    }
}
