//! The container's seccomp filter compiled once per profile (in the runtime, with libseccomp),
//! and installed by the container's init from the compiled program instead of compiled anew
//! by libcontainer in every init (~8 ms of CPU per create for the RuntimeDefault profile).
//!
//! libcontainer 0.7 can only compile the spec's profile itself. So when a profile compiles
//! here, the spec handed to libcontainer carries no seccomp section, the program is written
//! beside it (`seccomp.bpf`, with [`Plan`] in `seccomp.json`), and the monitor's executor
//! ([`Install`]) loads it in the init just before the init reports ready: the point where
//! libcontainer itself loads a filter when no_new_privs is set. Without no_new_privs, loading
//! a filter needs CAP_SYS_ADMIN, which libcontainer has dropped by then; the spec then grants
//! the init CAP_SYS_ADMIN (and CAP_SETPCAP, to drop from the bounding set) on top of the
//! container's own capabilities, and the executor drops exactly those again right after the
//! filter is loaded, before anything of the container runs. A failure at any step fails the
//! create: a container never runs with the extra capabilities or without its filter.
//!
//! Profiles that need the parts only libcontainer's path has (a SCMP_ACT_NOTIFY action, a
//! listener) are left in the spec for libcontainer. It must not do anything else.

use std::collections::HashSet;
use std::io::{Read, Seek};
use std::os::fd::AsFd;
use std::path::Path;

use libcontainer::capabilities::CapabilityExt;

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use oci_spec::runtime::{
    Arch, Capability, LinuxCapabilities, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};
use serde::{Deserialize, Serialize};

use super::seccomp::SeccompError;

/// The [`Plan`] with the compiled program, beside the spec in the bundle.
pub const PLAN_FILE: &str = "seccomp.json";

/// A profile compiled to the classic BPF program the kernel loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// `struct sock_filter` array, as libseccomp exports it (native byte order).
    pub program: Vec<u8>,
    /// SECCOMP_FILTER_FLAG_* for seccomp(2).
    pub flags: u32,
}

/// What the init does besides loading the program, and the profile it came from (the
/// container's OCI seccomp section, for `inspect` and for anyone rebuilding the full spec).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The `struct sock_filter` array, hex.
    pub program: String,
    /// SECCOMP_FILTER_FLAG_* for seccomp(2).
    pub flags: u32,
    /// Capabilities the spec added to the bounding set only for loading the filter.
    #[serde(default)]
    pub drop_bounding: Vec<Capability>,
    /// Capabilities the spec added to the effective and permitted sets only for loading it.
    #[serde(default)]
    pub drop_effective: Vec<Capability>,
    /// The OCI profile the program was compiled from.
    pub profile: LinuxSeccomp,
}

const SECCOMP_FILTER_FLAG_TSYNC: u32 = 1;
const SECCOMP_FILTER_FLAG_LOG: u32 = 2;
const SECCOMP_FILTER_FLAG_SPEC_ALLOW: u32 = 4;

/// Compiles `profile` (OCI meaning of every field) with libseccomp; `None` when it needs
/// libcontainer's own path (a notify action or a listener).
pub fn compile(profile: &LinuxSeccomp) -> Result<Option<Compiled>, SeccompError> {
    let notify = profile.default_action() == LinuxSeccompAction::ScmpActNotify
        || profile.listener_path().is_some()
        || profile
            .syscalls()
            .iter()
            .flatten()
            .any(|s| s.action() == LinuxSeccompAction::ScmpActNotify);
    let mut flags = 0;
    for flag in profile.flags().iter().flatten() {
        flags |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => return Ok(None),
        };
    }
    if notify {
        return Ok(None);
    }
    let err = |what: &str, e: libseccomp::error::SeccompError| {
        SeccompError::Build(format!("{what}: {e}"))
    };
    let default = action(profile.default_action(), profile.default_errno_ret())?;
    let mut ctx = ScmpFilterContext::new(default).map_err(|e| err("new filter", e))?;
    // The init sets no_new_privs itself when the spec asks; the load must not.
    ctx.set_ctl_nnp(false)
        .map_err(|e| err("no_new_privs attribute", e))?;
    for arch in profile.architectures().iter().flatten() {
        ctx.add_arch(scmp_arch(*arch))
            .map_err(|e| err(&format!("architecture {arch:?}"), e))?;
    }
    for rule in profile.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            continue;
        }
        let conditions: Vec<ScmpArgCompare> = rule
            .args()
            .iter()
            .flatten()
            .map(|a| {
                let op = match a.op() {
                    LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
                    LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
                    LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
                    LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
                    LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
                    LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
                    // OCI (and runc): `value` is the mask, `valueTwo` the datum.
                    LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpCompareOp::MaskedEqual(a.value()),
                };
                let datum = match a.op() {
                    LinuxSeccompOperator::ScmpCmpMaskedEq => a.value_two().unwrap_or(0),
                    _ => a.value(),
                };
                ScmpArgCompare::new(a.index() as u32, op, datum)
            })
            .collect();
        // libseccomp compares each argument once per rule: with two conditions on one
        // argument, each becomes a rule of its own (as runc does).
        let mut seen = HashSet::new();
        let separate = !rule.args().iter().flatten().all(|a| seen.insert(a.index()));
        for name in rule.names() {
            // A name this libseccomp does not know is a syscall this kernel cannot have.
            let Ok(nr) = ScmpSyscall::from_name(name) else {
                continue;
            };
            let added = if conditions.is_empty() {
                ctx.add_rule(act, nr).map(drop)
            } else if separate {
                conditions.iter().try_for_each(|c| {
                    ctx.add_rule_conditional(act, nr, std::slice::from_ref(c))
                        .map(drop)
                })
            } else {
                ctx.add_rule_conditional(act, nr, &conditions).map(drop)
            };
            added.map_err(|e| err(&format!("rule for {name}"), e))?;
        }
    }
    let memfd = rustix::fs::memfd_create("keel-seccomp", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| SeccompError::Build(format!("memfd: {e}")))?;
    ctx.export_bpf(memfd.as_fd())
        .map_err(|e| err("export", e))?;
    let mut file = std::fs::File::from(memfd);
    let mut program = Vec::new();
    file.rewind()
        .and_then(|()| file.read_to_end(&mut program))
        .map_err(|e| SeccompError::Build(format!("read exported filter: {e}")))?;
    if program.is_empty() || program.len() % 8 != 0 {
        return Err(SeccompError::Build(format!(
            "libseccomp exported {} bytes, not a whole number of instructions",
            program.len()
        )));
    }
    Ok(Some(Compiled { program, flags }))
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, SeccompError> {
    let errno = errno.map(|e| e as i32).unwrap_or(libc::EPERM);
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => ScmpAction::Errno(errno),
        LinuxSeccompAction::ScmpActTrace => ScmpAction::Trace(
            u16::try_from(errno)
                .map_err(|_| SeccompError::Build(format!("SCMP_ACT_TRACE value {errno}")))?,
        ),
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActNotify => ScmpAction::Notify,
    })
}

fn scmp_arch(a: Arch) -> ScmpArch {
    match a {
        Arch::ScmpArchNative => ScmpArch::Native,
        Arch::ScmpArchX86 => ScmpArch::X86,
        Arch::ScmpArchX86_64 => ScmpArch::X8664,
        Arch::ScmpArchX32 => ScmpArch::X32,
        Arch::ScmpArchArm => ScmpArch::Arm,
        Arch::ScmpArchAarch64 => ScmpArch::Aarch64,
        Arch::ScmpArchMips => ScmpArch::Mips,
        Arch::ScmpArchMips64 => ScmpArch::Mips64,
        Arch::ScmpArchMips64n32 => ScmpArch::Mips64N32,
        Arch::ScmpArchMipsel => ScmpArch::Mipsel,
        Arch::ScmpArchMipsel64 => ScmpArch::Mipsel64,
        Arch::ScmpArchMipsel64n32 => ScmpArch::Mipsel64N32,
        Arch::ScmpArchPpc => ScmpArch::Ppc,
        Arch::ScmpArchPpc64 => ScmpArch::Ppc64,
        Arch::ScmpArchPpc64le => ScmpArch::Ppc64Le,
        Arch::ScmpArchS390 => ScmpArch::S390,
        Arch::ScmpArchS390x => ScmpArch::S390X,
        Arch::ScmpArchRiscv64 => ScmpArch::Riscv64,
        Arch::ScmpArchParisc => ScmpArch::Parisc,
        Arch::ScmpArchParisc64 => ScmpArch::Parisc64,
        Arch::ScmpArchLoongarch64 => ScmpArch::Loongarch64,
        Arch::ScmpArchM68k => ScmpArch::M68k,
        Arch::ScmpArchSh => ScmpArch::Sh,
        Arch::ScmpArchSheb => ScmpArch::Sheb,
    }
}

/// Capabilities the init needs for loading a filter without no_new_privs: CAP_SYS_ADMIN for
/// seccomp(2), CAP_SETPCAP for dropping from the bounding set afterwards.
const LOAD_CAPS: [Capability; 2] = [Capability::SysAdmin, Capability::Setpcap];

/// Takes the compiled profile out of the spec's process: grants what loading needs when
/// `no_new_privs` is off and returns the plan that says what to drop again.
pub fn plan(
    compiled: &Compiled,
    profile: LinuxSeccomp,
    no_new_privs: bool,
    caps: Option<&mut LinuxCapabilities>,
) -> Plan {
    let mut plan = Plan {
        program: hex::encode(&compiled.program),
        flags: compiled.flags,
        profile,
        ..Plan::default()
    };
    if no_new_privs {
        return plan;
    }
    let Some(caps) = caps else {
        // No capabilities section: libcontainer leaves the init's (full) sets alone.
        return plan;
    };
    let mut bounding = caps.bounding().clone().unwrap_or_default();
    let mut effective = caps.effective().clone().unwrap_or_default();
    let mut permitted = caps.permitted().clone().unwrap_or_default();
    for cap in LOAD_CAPS {
        if bounding.insert(cap) {
            plan.drop_bounding.push(cap);
        }
        // `|`, not `||`: both sets get it, and both lose it again (the spec gives the
        // effective and permitted sets the same capabilities).
        if effective.insert(cap) | permitted.insert(cap) {
            plan.drop_effective.push(cap);
        }
    }
    caps.set_bounding(Some(bounding));
    caps.set_effective(Some(effective));
    caps.set_permitted(Some(permitted));
    plan
}

/// Writes the plan into the bundle.
pub fn write(bundle: &Path, plan: &Plan) -> Result<(), String> {
    let text = serde_json::to_vec(plan).map_err(|e| format!("serialize {PLAN_FILE}: {e}"))?;
    // Beside config.json, and like it not fsync'd (see container_create).
    crate::fsutil::replace_file(&bundle.join(PLAN_FILE), &text).map_err(|e| e.to_string())
}

/// The part of the plan the init needs.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InstallPlan {
    program: String,
    flags: u32,
    #[serde(default)]
    drop_bounding: Vec<Capability>,
    #[serde(default)]
    drop_effective: Vec<Capability>,
}

/// What the init loads, read by the monitor (or the exec helper) from the bundle before
/// libcontainer forks; `None` when the bundle has no compiled filter.
#[derive(Debug, Clone)]
pub struct Install {
    program: Vec<u8>,
    flags: u32,
    drop_bounding: Vec<caps::Capability>,
    drop_effective: Vec<caps::Capability>,
}

impl Install {
    /// The bundle's compiled filter and plan, if it has them.
    pub fn read(bundle: &Path) -> Result<Option<Install>, String> {
        let text = match std::fs::read(bundle.join(PLAN_FILE)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("read {PLAN_FILE}: {e}")),
        };
        let plan: InstallPlan =
            serde_json::from_slice(&text).map_err(|e| format!("parse {PLAN_FILE}: {e}"))?;
        let program =
            hex::decode(&plan.program).map_err(|e| format!("{PLAN_FILE}: program: {e}"))?;
        if program.is_empty() || program.len() % 8 != 0 {
            return Err(format!("{PLAN_FILE}: a program of {} bytes", program.len()));
        }
        let to_caps = |list: &[Capability]| list.iter().map(|c| c.to_cap()).collect();
        Ok(Some(Install {
            program,
            flags: plan.flags,
            drop_bounding: to_caps(&plan.drop_bounding),
            drop_effective: to_caps(&plan.drop_effective),
        }))
    }

    /// In the container's init: loads the filter, then drops what the spec added for it.
    pub fn apply(&self) -> Result<(), String> {
        let prog = libc::sock_fprog {
            len: u16::try_from(self.program.len() / 8).map_err(|_| {
                format!("seccomp program of {} instructions", self.program.len() / 8)
            })?,
            filter: self.program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `prog` points at `len` whole sock_filter records in `self.program`, which
        // outlives the call; the kernel copies the program before returning.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                self.flags as libc::c_ulong,
                &prog as *const libc::sock_fprog,
            )
        };
        if rc < 0 {
            return Err(format!(
                "load seccomp filter: {}",
                std::io::Error::last_os_error()
            ));
        }
        for cap in &self.drop_bounding {
            caps::drop(None, caps::CapSet::Bounding, *cap)
                .map_err(|e| format!("drop {cap} from the bounding set: {e}"))?;
        }
        if !self.drop_effective.is_empty() {
            let mut effective = caps::read(None, caps::CapSet::Effective)
                .map_err(|e| format!("read effective capabilities: {e}"))?;
            let mut permitted = caps::read(None, caps::CapSet::Permitted)
                .map_err(|e| format!("read permitted capabilities: {e}"))?;
            for cap in &self.drop_effective {
                effective.remove(cap);
                permitted.remove(cap);
            }
            caps::set(None, caps::CapSet::Effective, &effective)
                .map_err(|e| format!("set effective capabilities: {e}"))?;
            caps::set(None, caps::CapSet::Permitted, &permitted)
                .map_err(|e| format!("set permitted capabilities: {e}"))?;
        }
        Ok(())
    }
}

/// Compiled programs by profile, shared by a runtime's clones: the RuntimeDefault profile of
/// a capability set compiles once per daemon instead of once per container.
#[derive(Debug, Default)]
pub struct FilterCache {
    /// (the profile as JSON, its program), most recently used last.
    entries: std::sync::Mutex<Vec<(String, Option<std::sync::Arc<Compiled>>)>>,
}

/// Distinct profiles kept: capability sets differ per workload, Localhost profiles per file.
const CACHED_PROFILES: usize = 32;

impl FilterCache {
    /// `profile` compiled, from the cache when it was compiled before; `None` when it needs
    /// libcontainer's path.
    pub fn get(
        &self,
        profile: &LinuxSeccomp,
    ) -> Result<Option<std::sync::Arc<Compiled>>, SeccompError> {
        let key = serde_json::to_string(profile)
            .map_err(|e| SeccompError::Build(format!("serialize profile: {e}")))?;
        {
            let mut entries = self.lock();
            if let Some(i) = entries.iter().position(|(k, _)| *k == key) {
                let entry = entries.remove(i);
                let compiled = entry.1.clone();
                entries.push(entry);
                return Ok(compiled);
            }
        }
        let compiled = compile(profile)?.map(std::sync::Arc::new);
        let mut entries = self.lock();
        if entries.len() >= CACHED_PROFILES {
            entries.remove(0);
        }
        entries.push((key, compiled.clone()));
        Ok(compiled)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Option<std::sync::Arc<Compiled>>)>> {
        // A panic while holding it left a whole Vec: the entries are still valid.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The container's workload as libcontainer's default executor runs it, with the compiled
/// filter loaded (and the capabilities for loading it dropped) once the init is set up.
#[derive(Clone)]
pub struct FilterExecutor {
    install: Install,
}

impl FilterExecutor {
    pub fn new(install: Install) -> Self {
        FilterExecutor { install }
    }
}

impl libcontainer::workload::Executor for FilterExecutor {
    fn exec(
        &self,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(), libcontainer::workload::ExecutorError> {
        libcontainer::workload::default::DefaultExecutor {}.exec(spec)
    }

    /// Runs in the init after pivot_root and the capability drop, before it reports ready:
    /// where libcontainer loads a filter itself under no_new_privs.
    fn validate(
        &self,
        spec: &oci_spec::runtime::Spec,
    ) -> Result<(), libcontainer::workload::ExecutorValidationError> {
        libcontainer::workload::default::DefaultExecutor {}.validate(spec)?;
        self.install
            .apply()
            .map_err(libcontainer::workload::ExecutorValidationError::ArgValidationError)
    }

    fn setup_envs(
        &self,
        envs: std::collections::HashMap<String, String>,
    ) -> Result<(), libcontainer::workload::ExecutorSetEnvsError> {
        libcontainer::workload::default::DefaultExecutor {}.setup_envs(envs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::seccomp::default_profile;
    use oci_spec::runtime::LinuxCapabilitiesBuilder;

    fn default_caps() -> HashSet<Capability> {
        crate::container::spec::DEFAULT_CAPABILITIES
            .iter()
            .map(|c| crate::container::spec::parse_capability(c).unwrap())
            .collect()
    }

    fn compiled_default() -> Compiled {
        compile(&default_profile(&default_caps()).unwrap())
            .unwrap()
            .expect("the default profile compiles")
    }

    /// Runs `check` in a forked child under the compiled default filter (no_new_privs, so no
    /// capability is needed) and returns its exit code. The child only makes raw syscalls.
    fn under_filter(compiled: &Compiled, check: fn() -> i32) -> i32 {
        let prog = libc::sock_fprog {
            len: (compiled.program.len() / 8) as u16,
            filter: compiled.program.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: the child makes only raw syscalls (no allocation, no locks) and _exits.
        match unsafe { libc::fork() } {
            0 => unsafe {
                // SAFETY: prctl and seccomp take the plain values and the program above.
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                    || libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0,
                        &prog as *const libc::sock_fprog,
                    ) != 0
                {
                    libc::_exit(100);
                }
                libc::_exit(check())
            },
            pid if pid > 0 => {
                let mut status = 0;
                // SAFETY: waits for the child forked above.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "child status {status:#x}");
                libc::WEXITSTATUS(status)
            }
            _ => panic!("fork: {}", std::io::Error::last_os_error()),
        }
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn compiled_default_profile_refuses_namespaces_and_allows_the_rest() {
        let compiled = compiled_default();
        assert_eq!(compiled.flags, 0);
        // SAFETY (in the checks): raw syscalls with plain arguments.
        // unshare is not allowed without CAP_SYS_ADMIN: EPERM from the filter.
        assert_eq!(
            under_filter(&compiled, || unsafe {
                if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                    0
                } else {
                    errno()
                }
            }),
            libc::EPERM
        );
        // clone with a namespace flag: refused by the MASKED_EQ rule (mask, then datum).
        assert_eq!(
            under_filter(&compiled, || unsafe {
                let r = libc::syscall(
                    libc::SYS_clone,
                    libc::CLONE_NEWUSER | libc::SIGCHLD,
                    0,
                    0,
                    0,
                    0,
                );
                match r {
                    0 => libc::_exit(0),
                    r if r > 0 => 0,
                    _ => errno(),
                }
            }),
            libc::EPERM
        );
        // a plain fork-like clone and ordinary calls pass.
        assert_eq!(
            under_filter(&compiled, || unsafe {
                let r = libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
                match r {
                    0 => libc::_exit(0),
                    r if r > 0 => {
                        let mut st = 0;
                        libc::waitpid(r as i32, &mut st, 0);
                        if libc::getpid() > 0 { 7 } else { 1 }
                    }
                    _ => errno(),
                }
            }),
            7
        );
        // clone3 answers ENOSYS, so libcs fall back to the filtered clone.
        assert_eq!(
            under_filter(&compiled, || unsafe {
                if libc::syscall(libc::SYS_clone3, 0, 0) == 0 {
                    0
                } else {
                    errno()
                }
            }),
            libc::ENOSYS
        );
    }

    #[test]
    fn notify_profiles_stay_with_libcontainer() {
        let mut p = default_profile(&default_caps()).unwrap();
        p.set_listener_path(Some("/run/listener.sock".into()));
        assert_eq!(compile(&p).unwrap(), None);
        let mut p = default_profile(&default_caps()).unwrap();
        let mut rules = p.syscalls().clone().unwrap();
        rules[0].set_action(LinuxSeccompAction::ScmpActNotify);
        p.set_syscalls(Some(rules));
        assert_eq!(compile(&p).unwrap(), None);
    }

    #[test]
    fn plan_lends_only_what_the_container_lacks() {
        let compiled = compiled_default();
        let profile = default_profile(&default_caps()).unwrap();
        let caps_of = |set: HashSet<Capability>| {
            LinuxCapabilitiesBuilder::default()
                .bounding(set.clone())
                .effective(set.clone())
                .permitted(set.clone())
                .build()
                .unwrap()
        };
        // Default set: has SETPCAP, lacks SYS_ADMIN.
        let mut caps = caps_of(default_caps());
        let plan = plan(&compiled, profile.clone(), false, Some(&mut caps));
        assert_eq!(plan.drop_bounding, vec![Capability::SysAdmin]);
        assert_eq!(plan.drop_effective, vec![Capability::SysAdmin]);
        assert!(
            caps.bounding()
                .as_ref()
                .unwrap()
                .contains(&Capability::SysAdmin)
        );
        assert!(
            caps.effective()
                .as_ref()
                .unwrap()
                .contains(&Capability::SysAdmin)
        );
        assert_eq!(hex::decode(&plan.program).unwrap(), compiled.program);
        // No capability at all: both are lent.
        let mut caps = caps_of(HashSet::new());
        let plan = plan_of(&compiled, &profile, false, &mut caps);
        assert_eq!(
            plan.drop_bounding,
            vec![Capability::SysAdmin, Capability::Setpcap]
        );
        // Already there: nothing to lend or drop.
        let mut all = default_caps();
        all.insert(Capability::SysAdmin);
        let mut caps = caps_of(all.clone());
        let plan = plan_of(&compiled, &profile, false, &mut caps);
        assert!(plan.drop_bounding.is_empty() && plan.drop_effective.is_empty());
        assert_eq!(caps.bounding().as_ref().unwrap(), &all);
        // no_new_privs: loading needs no capability.
        let mut caps = caps_of(default_caps());
        let plan = plan_of(&compiled, &profile, true, &mut caps);
        assert!(plan.drop_bounding.is_empty() && plan.drop_effective.is_empty());
        assert_eq!(caps.bounding().as_ref().unwrap(), &default_caps());
    }

    fn plan_of(c: &Compiled, p: &LinuxSeccomp, nnp: bool, caps: &mut LinuxCapabilities) -> Plan {
        plan(c, p.clone(), nnp, Some(caps))
    }

    #[test]
    fn cache_compiles_a_profile_once() {
        let cache = FilterCache::default();
        let p = default_profile(&default_caps()).unwrap();
        let a = cache.get(&p).unwrap().unwrap();
        let b = cache.get(&p).unwrap().unwrap();
        assert!(std::sync::Arc::ptr_eq(&a, &b));
        let mut other = default_caps();
        other.insert(Capability::SysAdmin);
        let c = cache
            .get(&default_profile(&other).unwrap())
            .unwrap()
            .unwrap();
        assert_ne!(a.program, c.program);
    }
}
