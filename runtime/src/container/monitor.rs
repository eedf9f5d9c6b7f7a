//! The per-container monitor: the keel binary re-executed as `keel __monitor <containers>
//! <run> <id>`. It detaches (fork, setsid), becomes the child subreaper, creates the container
//! with libcontainer with its stdio on pipes it owns, and tells the spawner "ok" or the error
//! on its stdout. Then it execs the small `keel-monitor` watcher ([`WATCHER_BIN`]; in place
//! when there is none), which copies the container's output into the CRI log (SIGUSR1 reopens
//! the file after rotation), reaps the init and whatever is reparented to it, and writes
//! `exit.json` (exit code, signal, OOM kill, finish time) atomically before exiting.
//!
//! It outlives the daemon and the CLI that spawned it. It must stay small: no async runtime,
//! no threads, one poll loop over two pipes and a signalfd; the exec leaves behind the pages
//! the large binary and libcontainer touched (idle RSS ~0.8 MiB instead of ~6-7 MiB).

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use super::cgroups;
use super::container_attach::{self as attach, SOCKET};
use super::crilog::{CriLogWriter, Stream};
use super::seccomp_bpf::{FilterExecutor, Install};
use super::state::{ContainerRecord, ExitRecord, Paths, RunState, read_json, write_json};
use super::sys::ProcessId;
use super::tty::{ConsoleSocket, bind_in};

/// First argument of a monitor invocation.
pub const MONITOR_ARG: &str = "__monitor";

/// What the monitor says on its stdout when the container is created.
pub const READY: &str = "ok";

/// First argument of the watch loop's invocation: the monitor, once the container is created,
/// re-executes itself as the small [`WATCHER_BIN`] (same pid, same children, same pipes) so the
/// pages libcontainer and the large binary touched are not kept resident for the container's
/// life.
pub const WATCH_ARG: &str = "__watch";

/// Version of the watch arguments. A watcher that gets another version (a stale binary next
/// to a newer keel) hands the process back to the monitor's own executable, which runs the
/// loop itself.
pub const WATCH_PROTOCOL: &str = "2";

/// The dedicated watcher binary (`runtime/src/bin/keel-monitor.rs`), looked up next to the
/// monitor's executable (and, for cargo's test binaries in `deps/`, one directory up), or
/// named by `KEEL_MONITOR_BIN`.
pub const WATCHER_BIN: &str = "keel-monitor";

/// If argv[1] names one of the hidden helper roles (monitor, exec), runs it and returns its
/// exit code; otherwise `None`. Call first thing in `main` of any binary used as monitor.
pub fn hidden_main() -> Option<i32> {
    let args: Vec<OsString> = std::env::args_os().collect();
    let role = args.get(1)?.to_str()?;
    let rest: Vec<String> = args[2..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match role {
        MONITOR_ARG => Some(main(&rest)),
        WATCH_ARG => Some(watch_main(&rest)),
        super::container_exec::EXEC_ARG => Some(super::container_exec::helper_main(&rest)),
        crate::pod::keeper::KEEPER_ARG => Some(crate::pod::keeper::main(&rest)),
        _ => None,
    }
}

/// The monitor's entry: `<containers dir> <run dir> <id>`. Returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let [containers, run, id] = args else {
        eprintln!("usage: keel {MONITOR_ARG} CONTAINERS_DIR RUN_DIR ID");
        return 2;
    };
    let paths = Paths {
        containers: PathBuf::from(containers),
        run: PathBuf::from(run),
    };
    // SAFETY: the process is single-threaded here (nothing has spawned a thread), so the
    // child may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { .. }) => return 0,
        Ok(nix::unistd::ForkResult::Child) => {}
        Err(e) => {
            println!("error: fork monitor: {e}");
            return 1;
        }
    }
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_child_subreaper(true);
    redirect_stderr(&paths.monitor_log(id));
    // libcontainer explains failures (a mount that failed, ...) only through tracing.
    // A plain level, not an EnvFilter: its regexes would cost the monitor memory for good.
    let level = std::env::var("KEEL_MONITOR_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::ERROR);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    match Monitor::start(&paths, id) {
        Ok(m) => {
            say(READY);
            detach_stdout();
            // Returns only when there is no watcher to become.
            if let Err(e) = m.exec_watcher() {
                eprintln!("monitor {id}: watching in place: {e}");
            }
            // Creating the container used memory the watch loop never needs again.
            // SAFETY: malloc_trim only releases free heap pages; no pointer is invalidated.
            unsafe {
                libc::malloc_trim(0);
            }
            m.run();
            0
        }
        Err(e) => {
            eprintln!("monitor {id}: {e}");
            say(&format!("error: {e}"));
            1
        }
    }
}

/// The watch loop's entry, in the process the monitor re-executed: `<protocol> <monitor exe>
/// <containers dir> <run dir> <id> <init pid> <stdout fd> <stderr fd> <input fd> <attach
/// socket fd>`, a `-` for a descriptor there is none of.
pub fn watch_main(args: &[String]) -> i32 {
    if args.first().map(String::as_str) != Some(WATCH_PROTOCOL) {
        let (Some(protocol), Some(monitor_exe), Some(id)) =
            (args.first(), args.get(1), args.get(4))
        else {
            eprintln!("usage: {WATCH_ARG} PROTOCOL MONITOR_EXE ...");
            return 2;
        };
        // Not our arguments: the monitor that spawned us knows them.
        let e = exec(Path::new(monitor_exe), WATCH_ARG, args);
        eprintln!("monitor {id}: watch protocol {protocol}, and exec {monitor_exe}: {e}");
        return 1;
    }
    let [_, _, containers, run, id, init, out, err, input, listener] = args else {
        eprintln!(
            "usage: {WATCH_ARG} {WATCH_PROTOCOL} MONITOR_EXE CONTAINERS_DIR RUN_DIR ID PID FD FD FD FD"
        );
        return 2;
    };
    let paths = Paths {
        containers: PathBuf::from(containers),
        run: PathBuf::from(run),
    };
    let fd = |s: &str| -> Option<OwnedFd> {
        let n: i32 = s.parse().ok()?;
        // SAFETY: the monitor that exec'd this process passed these descriptors (its pipes'
        // read ends, without close-on-exec) and nothing else in this process owns them.
        (n > 2).then(|| unsafe { OwnedFd::from_raw_fd(n) })
    };
    let Some(init) = init.parse().ok().map(Pid::from_raw) else {
        eprintln!("monitor {id}: bad watch arguments {args:?}");
        return 2;
    };
    let io = Stdio {
        stdout: fd(out),
        stderr: fd(err),
        input: fd(input),
        listener: fd(listener).map(UnixListener::from),
    };
    match Monitor::resume(&paths, id, init, io) {
        Ok(m) => {
            release_startup_pages();
            m.run();
            0
        }
        Err(e) => {
            eprintln!("monitor {id}: {e}");
            1
        }
    }
}

/// Unmaps the file pages startup touched (loader, relocation, libc and std init, reading the
/// record) from this process: read-only file mappings holding no private copy, so their
/// content is the file's and the loop's few pages fault back in from the page cache. The
/// pages stay in the page cache (shared with every other monitor); what shrinks is what
/// this process keeps mapped, which is what its RSS counts. Then the heap is trimmed.
fn release_startup_pages() {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    let mut candidate: Option<(usize, usize)> = None;
    let mut ranges = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        {
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            candidate = (!perms.contains('w') && perms.ends_with('p') && path.starts_with('/'))
                .then_some((lo, hi - lo));
        } else if first == "Anonymous:"
            && let Some(range) = candidate.take()
            && fields.next() == Some("0")
        {
            ranges.push(range);
        }
    }
    drop(smaps);
    for (addr, len) in ranges {
        // SAFETY: each range is a whole private, read-only, file-backed mapping of this
        // process without anonymous (copied-on-write) pages: MADV_DONTNEED only drops its
        // page table entries, and any later access reads the same bytes from the file again.
        unsafe {
            libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED);
        }
    }
    // SAFETY: malloc_trim only releases free heap pages; no pointer is invalidated.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `exe <role> <args>` in place of this process; returns only on failure.
fn exec(exe: &Path, role: &str, args: &[String]) -> String {
    use std::os::unix::ffi::OsStrExt;
    let cstr = |b: &[u8]| std::ffi::CString::new(b).map_err(|e| e.to_string());
    let argv: Result<Vec<std::ffi::CString>, String> =
        [exe.as_os_str().as_bytes(), role.as_bytes()]
            .into_iter()
            .chain(args.iter().map(|a| a.as_bytes()))
            .map(cstr)
            .collect();
    match argv {
        // Not Command::exec: it would unblock the signals the watch loop reads from its
        // signalfd, and a SIGTERM in the gap would kill the monitor.
        Ok(argv) => match nix::unistd::execv(&argv[0], &argv) {
            Err(e) => e.to_string(),
            Ok(never) => match never {},
        },
        Err(e) => e,
    }
}

/// Where the watcher binary is, if anywhere.
fn watcher_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KEEL_MONITOR_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let me = std::fs::read_link("/proc/self/exe").ok()?;
    let dir = me.parent()?;
    let mut candidates = vec![dir.join(WATCHER_BIN)];
    if dir.file_name().is_some_and(|n| n == "deps")
        && let Some(up) = dir.parent()
    {
        candidates.push(up.join(WATCHER_BIN));
    }
    candidates.into_iter().find(|p| p.is_file())
}

fn say(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{msg}");
    let _ = out.flush();
}

fn redirect_stderr(path: &Path) {
    if let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = nix::unistd::dup2(f.as_raw_fd(), 2);
    }
}

/// Points stdout at /dev/null so the spawner sees EOF on the ready pipe.
fn detach_stdout() {
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
    }
}

struct Monitor {
    paths: Paths,
    record: ContainerRecord,
    init: Pid,
    /// The container's stdout pipe, or its terminal's master.
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// Where attached clients' stdin goes: the stdin pipe, or (a copy of) the master. Written
    /// without blocking: what the container has not taken yet waits in `pending`.
    input: Option<OwnedFd>,
    /// Attached clients' stdin the container has not read yet. Past [`PENDING_INPUT_MAX`] the
    /// loop stops reading the clients (their sockets fill, and they wait) instead of blocking:
    /// the container's output keeps flowing to the log while it ignores its stdin.
    pending: Vec<u8>,
    /// A client closed stdin while `pending` still held data: close once it is written.
    close_when_flushed: bool,
    /// The attach socket (containers with stdin or a tty; see `container_attach.rs`).
    listener: Option<UnixListener>,
    clients: Vec<Client>,
    signals: SignalFd,
    log: Option<CriLogWriter>,
}

/// How much unread stdin the monitor holds for a container before it stops reading clients.
const PENDING_INPUT_MAX: usize = 64 * 1024;

/// The container's side of the monitor's descriptors, handed to the watcher.
struct Stdio {
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    input: Option<OwnedFd>,
    listener: Option<UnixListener>,
}

/// An attached client and what it sent that is not a whole frame yet.
struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// Whether a process with the init's pid still exists (zombie included: it is ours to reap).
fn init_exists(pid: Pid) -> bool {
    nix::sys::signal::kill(pid, None).is_ok()
}

/// Whatever is buffered in a pipe, without blocking.
fn drain(fd: &OwnedFd) -> String {
    let _ = nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = nix::unistd::read(fd.as_raw_fd(), &mut buf) {
        if n == 0 || out.len() > 64 * 1024 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Blocks the signals the watch loop handles and returns the signalfd that reads them.
/// The mask survives exec, so the watcher's call only renews the descriptor.
fn signals() -> Result<SignalFd, String> {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGUSR1,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask.thread_block()
        .map_err(|e| format!("block signals: {e}"))?;
    // SAFETY: setting SIG_IGN installs no handler code; the process is single-threaded.
    let _ =
        unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigIgn) };
    SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| format!("signalfd: {e}"))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))
}

impl Monitor {
    fn start(paths: &Paths, id: &str) -> Result<Monitor, String> {
        let record: ContainerRecord = read_json(&paths.record(id))
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("container {id}: no record"))?;
        let cfg = &record.config;
        if let Some(parent) = record.log_path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let log = CriLogWriter::open(&record.log_path)
            .map_err(|e| format!("open log {}: {e}", record.log_path.display()))?;
        std::fs::create_dir_all(&paths.run)
            .map_err(|e| format!("create run dir {}: {e}", paths.run.display()))?;

        let dir = paths.dir(id);
        let mut builder = ContainerBuilder::new(id.to_string(), SyscallType::default())
            .with_root_path(&paths.run)
            .map_err(|e| format!("run dir: {e}"))?;
        // A terminal, or pipes (stdin: /dev/null, or a pipe when attach may write it).
        let mut console = None;
        let (mut stdout, mut stderr, mut input) = (None, None, None);
        if cfg.tty {
            let c = ConsoleSocket::bind(&dir)?;
            builder = builder.with_console_socket(Some(&c.path));
            console = Some(c);
        } else {
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            let stdin: OwnedFd = if cfg.stdin {
                let (in_r, in_w) = pipe()?;
                input = Some(in_w);
                in_r
            } else {
                File::open("/dev/null")
                    .map_err(|e| format!("open /dev/null: {e}"))?
                    .into()
            };
            builder = builder
                .with_stdin(stdin)
                .with_stdout(out_w)
                .with_stderr(err_w);
            (stdout, stderr) = (Some(out_r), Some(err_r));
        }
        let listener = if cfg.stdin || cfg.tty {
            let _ = std::fs::remove_file(dir.join(SOCKET));
            let l = bind_in(&dir, SOCKET)?;
            l.set_nonblocking(true)
                .map_err(|e| format!("attach socket: {e}"))?;
            Some(l)
        } else {
            None
        };
        // The container's seccomp filter, compiled by the runtime (see `seccomp_bpf`).
        if let Some(install) = Install::read(&paths.bundle(id))? {
            builder = builder.with_executor(FilterExecutor::new(install));
        }
        let container = builder
            .validate_id()
            .map_err(|e| format!("container id: {e}"))?
            .as_init(paths.bundle(id))
            .with_systemd(false)
            .with_detach(true)
            .as_sibling(false)
            .build()
            .map_err(|e| {
                // libcontainer's init reports the cause on the container's stderr.
                let detail = stderr.as_ref().map(drain).unwrap_or_default();
                format!("create container: {e}: {}", detail.trim())
            })?;
        if let Some(c) = console {
            let master = c.receive()?;
            if cfg.stdin {
                input = Some(
                    master
                        .try_clone()
                        .map_err(|e| format!("dup terminal: {e}"))?,
                );
            }
            stdout = Some(master);
        }
        let init = container
            .pid()
            .ok_or_else(|| "libcontainer reported no init pid".to_string())?;

        // Block the signals we handle only now: the container must not inherit the mask.
        let signals = signals()?;

        let state = RunState {
            monitor: ProcessId::of(std::process::id() as i32).ok(),
            init: ProcessId::of(init.as_raw()).ok(),
            started_at: None,
        };
        write_json(&paths.run_state(id), &state).map_err(|e| e.to_string())?;
        Ok(Monitor {
            paths: paths.clone(),
            record,
            init,
            stdout,
            stderr,
            input,
            listener,
            pending: Vec::new(),
            close_when_flushed: false,
            clients: Vec::new(),
            signals,
            log: Some(log),
        })
    }

    /// The monitor again after it re-executed itself as the watcher: the container exists,
    /// its run state is written, `init` is our child and `io` its stdio.
    fn resume(paths: &Paths, id: &str, init: Pid, io: Stdio) -> Result<Monitor, String> {
        let record: ContainerRecord = read_json(&paths.record(id))
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("container {id}: no record"))?;
        let log = CriLogWriter::open(&record.log_path)
            .map_err(|e| format!("open log {}: {e}", record.log_path.display()))?;
        Ok(Monitor {
            paths: paths.clone(),
            record,
            init,
            stdout: io.stdout,
            stderr: io.stderr,
            input: io.input,
            listener: io.listener,
            pending: Vec::new(),
            close_when_flushed: false,
            clients: Vec::new(),
            signals: signals()?,
            log: Some(log),
        })
    }

    /// Becomes the watcher binary, handing it the init and the pipes. Returns only when there
    /// is none or the exec failed; the monitor then watches in place.
    fn exec_watcher(&self) -> Result<(), String> {
        let Some(watcher) = watcher_path() else {
            return Ok(());
        };
        let fds: [Option<i32>; 4] = [
            self.stdout.as_ref().map(|f| f.as_raw_fd()),
            self.stderr.as_ref().map(|f| f.as_raw_fd()),
            self.input.as_ref().map(|f| f.as_raw_fd()),
            self.listener.as_ref().map(|f| f.as_raw_fd()),
        ];
        for fd in fds.iter().flatten() {
            nix::fcntl::fcntl(
                *fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map_err(|e| format!("clear close-on-exec: {e}"))?;
        }
        let arg = |fd: Option<i32>| fd.map(|f| f.to_string()).unwrap_or_else(|| "-".into());
        let me = std::fs::read_link("/proc/self/exe").map_err(|e| format!("own exe: {e}"))?;
        let args = [
            WATCH_PROTOCOL.to_string(),
            me.to_string_lossy().into_owned(),
            self.paths.containers.to_string_lossy().into_owned(),
            self.paths.run.to_string_lossy().into_owned(),
            self.record.id.clone(),
            self.init.as_raw().to_string(),
            arg(fds[0]),
            arg(fds[1]),
            arg(fds[2]),
            arg(fds[3]),
        ];
        let e = exec(&watcher, WATCH_ARG, &args);
        for fd in fds.iter().flatten() {
            let _ = nix::fcntl::fcntl(
                *fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
        }
        Err(format!("exec {}: {e}", watcher.display()))
    }

    fn write_log(&mut self, stream: Stream, data: &[u8]) {
        if let Some(log) = &mut self.log
            && let Err(e) = log.write(stream, data)
        {
            eprintln!("monitor {}: write log: {e}", self.record.id);
        }
    }

    /// Reads one chunk from a pipe; false at EOF.
    fn pump(&mut self, stream: Stream, buf: &mut [u8]) -> bool {
        let fd = match stream {
            Stream::Stdout => self.stdout.as_ref(),
            Stream::Stderr => self.stderr.as_ref(),
        };
        let Some(fd) = fd else { return false };
        match nix::unistd::read(fd.as_raw_fd(), buf) {
            Ok(0) => false,
            Ok(n) => {
                self.write_log(stream, &buf[..n]);
                self.broadcast(stream, &buf[..n]);
                true
            }
            Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => true,
            Err(_) => false,
        }
    }

    /// Sends output to every attached client; one that cannot take it within a second is
    /// dropped.
    fn broadcast(&mut self, stream: Stream, data: &[u8]) {
        if self.clients.is_empty() {
            return;
        }
        let kind = match stream {
            Stream::Stdout => attach::STDOUT,
            Stream::Stderr => attach::STDERR,
        };
        let f = attach::frame(kind, data);
        self.clients.retain_mut(|c| c.stream.write_all(&f).is_ok());
    }

    /// Takes the clients that are connecting.
    fn accept(&mut self) {
        let Some(l) = &self.listener else { return };
        while let Ok((stream, _)) = l.accept() {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            self.clients.push(Client {
                stream,
                buf: Vec::new(),
            });
        }
    }

    /// Reads what client `i` sent; false when it left (or broke the protocol).
    fn serve_client(&mut self, i: usize, buf: &mut [u8]) -> bool {
        let c = &mut self.clients[i];
        let n = match c.stream.read(buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        c.buf.extend_from_slice(&buf[..n]);
        let Ok(frames) = attach::take_frames(&mut c.buf) else {
            return false;
        };
        for (kind, data) in frames {
            match kind {
                attach::STDIN if self.input.is_some() => {
                    self.pending.extend_from_slice(&data);
                    self.flush_input();
                }
                attach::CLOSE_STDIN => self.close_input(),
                attach::RESIZE if data.len() == 4 => {
                    if self.record.config.tty
                        && let Some(master) = &self.stdout
                    {
                        let cols = u16::from_be_bytes([data[0], data[1]]);
                        let rows = u16::from_be_bytes([data[2], data[3]]);
                        let _ = super::container_exec_stream::resize_terminal(master, cols, rows);
                    }
                }
                _ => {}
            }
        }
        true
    }

    /// Writes what it can of `pending` without blocking; a broken stdin drops it all.
    fn flush_input(&mut self) {
        let Some(input) = &self.input else {
            self.pending.clear();
            return;
        };
        while !self.pending.is_empty() {
            match nix::unistd::write(input, &self.pending) {
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(_) => {
                    self.input = None;
                    self.pending.clear();
                    return;
                }
            }
        }
        if self.close_when_flushed {
            self.close_input();
        }
    }

    /// Closes the container's stdin (the pipe's end, or on a terminal its EOF character) once
    /// what clients sent before is written.
    fn close_input(&mut self) {
        if !self.pending.is_empty() {
            self.close_when_flushed = true;
            return;
        }
        self.close_when_flushed = false;
        if let Some(input) = self.input.take()
            && self.record.config.tty
        {
            let _ = nix::unistd::write(&input, &[4]);
        }
    }

    fn close(&mut self, stream: Stream) {
        match stream {
            Stream::Stdout => self.stdout = None,
            Stream::Stderr => self.stderr = None,
        }
        if let Some(log) = &mut self.log {
            let _ = log.finish(stream);
        }
    }

    /// Reaps every exited child; returns the init's status once seen.
    fn reap(&self) -> Option<(i32, Option<i32>)> {
        let mut init_status = None;
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == self.init => {
                    init_status = Some((code, None));
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == self.init => {
                    init_status = Some((128 + sig as i32, Some(sig as i32)));
                }
                Ok(WaitStatus::StillAlive) | Err(_) => return init_status,
                Ok(_) => {}
            }
        }
    }

    fn run(mut self) {
        if let Some(input) = &self.input {
            // On a terminal this is the master's description, shared with `stdout`: its reads
            // already treat EAGAIN as "nothing yet".
            let flags = nix::fcntl::fcntl(input.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
                .map(nix::fcntl::OFlag::from_bits_truncate)
                .unwrap_or(nix::fcntl::OFlag::empty());
            let _ = nix::fcntl::fcntl(
                input.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFL(flags | nix::fcntl::OFlag::O_NONBLOCK),
            );
        }
        let mut buf = vec![0u8; 32 * 1024];
        let mut exit = self.reap();
        let mut idle_after_exit = 0;
        loop {
            if exit.is_some() && self.stdout.is_none() && self.stderr.is_none() {
                break;
            }
            let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            let mut streams = Vec::new();
            if let Some(fd) = &self.stdout {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                streams.push(Stream::Stdout);
            }
            if let Some(fd) = &self.stderr {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                streams.push(Stream::Stderr);
            }
            let first_attach = fds.len();
            if let Some(l) = &self.listener {
                fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
            }
            // A container that does not read its stdin holds its clients back, not the loop.
            let client_events = if self.pending.len() < PENDING_INPUT_MAX {
                PollFlags::POLLIN
            } else {
                PollFlags::empty()
            };
            for c in &self.clients {
                fds.push(PollFd::new(c.stream.as_fd(), client_events));
            }
            let input_at = fds.len();
            if let Some(input) = self.input.as_ref().filter(|_| !self.pending.is_empty()) {
                fds.push(PollFd::new(input.as_fd(), PollFlags::POLLOUT));
            }
            // Once init is gone, processes that inherited its stdio (host pid namespace) get
            // two seconds of quiet before the monitor stops waiting for them.
            // With both pipes closed and no status yet, check now and then that the init still
            // exists: one that escaped the reaper must not leave the monitor waiting forever.
            let pipes_closed = self.stdout.is_none() && self.stderr.is_none();
            let timeout = if exit.is_some() || pipes_closed {
                PollTimeout::from(500u16)
            } else {
                PollTimeout::NONE
            };
            let n = match poll(&mut fds, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("monitor {}: poll: {e}", self.record.id);
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if n == 0 && exit.is_none() {
                exit = self.reap();
                if exit.is_none() && !init_exists(self.init) {
                    break;
                }
                continue;
            }
            if n == 0 {
                idle_after_exit += 1;
                if idle_after_exit >= 4 {
                    break;
                }
                continue;
            }
            idle_after_exit = 0;
            let revents: Vec<PollFlags> = fds
                .iter()
                .map(|f| f.revents().unwrap_or(PollFlags::empty()))
                .collect();
            drop(fds);
            if !revents[0].is_empty() {
                while let Ok(Some(info)) = self.signals.read_signal() {
                    if info.ssi_signo == Signal::SIGUSR1 as u32
                        && let Some(log) = &mut self.log
                        && let Err(e) = log.reopen()
                    {
                        eprintln!("monitor {}: reopen log: {e}", self.record.id);
                    }
                }
                if exit.is_none() {
                    exit = self.reap();
                } else {
                    self.reap();
                }
            }
            let mut at = first_attach;
            let mut connecting = false;
            if self.listener.is_some() {
                connecting = !revents[at].is_empty();
                at += 1;
            }
            if revents.len() > input_at {
                self.flush_input();
            }
            // Clients first (their input may be what the container is waiting for); the ones
            // that left go, and with stdin_once the container's stdin with the first of them.
            let n_clients = input_at - at;
            let mut gone = Vec::new();
            for i in 0..n_clients.min(self.clients.len()) {
                if !revents[at + i].is_empty() && !self.serve_client(i, &mut buf) {
                    gone.push(i);
                }
            }
            for i in gone.into_iter().rev() {
                self.clients.remove(i);
                if self.record.config.stdin_once {
                    self.close_input();
                }
            }
            if connecting {
                self.accept();
            }
            for (i, stream) in streams.into_iter().enumerate() {
                let ev = revents[i + 1];
                if ev.intersects(PollFlags::POLLIN) {
                    if !self.pump(stream, &mut buf) {
                        self.close(stream);
                    }
                } else if ev
                    .intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL)
                {
                    self.close(stream);
                }
            }
        }
        for s in [Stream::Stdout, Stream::Stderr] {
            if self.log.is_some() {
                self.close(s);
            }
        }
        self.log = None;
        if self.listener.take().is_some() {
            self.clients.clear();
            let _ = std::fs::remove_file(self.paths.dir(&self.record.id).join(attach::SOCKET));
        }
        let (exit_code, signal, reason) = match exit {
            Some((code, sig)) => (code, sig, None),
            None => (255, None, Some("init status lost".to_string())),
        };
        let record = ExitRecord {
            exit_code,
            signal,
            oom_killed: cgroups::oom_killed(&self.record.cgroups_path),
            finished_at: chrono::Utc::now(),
            reason,
        };
        if let Err(e) = write_json(&self.paths.exit(&self.record.id), &record) {
            eprintln!("monitor {}: write exit status: {e}", self.record.id);
        }
        // Orphans of the container that still hold us as reaper.
        while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
    }
}
