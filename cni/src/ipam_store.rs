//! Crash-safe allocation records: one file per allocated address under the network's data dir
//! (`<dataDir>/<network>/<ip>`, content `<containerID>\r\n<ifname>` as host-local writes it), an
//! `flock`ed `lock` file serialising every change, and `last_reserved_ip.<set>` hints.
//!
//! A record is written to a temporary file, fsynced, then hard-linked to its address name: the
//! link either fails (address taken) or publishes a complete record, so a plugin killed at any
//! point leaves at worst a stale `.tmp-*` file or a complete record of an attachment the runtime
//! does not know, both removed by GC. Records are read by name only where possible.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::config::{Attachment, Network};
use crate::ipam::{self, IpamError};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system call on the store failed.
    #[error("ipam store {path}: {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The allocator refused.
    #[error(transparent)]
    Ipam(#[from] IpamError),
}

impl StoreError {
    /// The CNI error code for this error.
    pub fn code(&self) -> u32 {
        match self {
            Self::Io { .. } => crate::protocol::code::IO_FAILURE,
            Self::Ipam(e) => e.code(),
        }
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

const LOCK_FILE: &str = "lock";
const LAST_PREFIX: &str = "last_reserved_ip.";
const TMP_PREFIX: &str = ".tmp-";

/// One allocation record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The address.
    pub ip: IpAddr,
    /// Owner container.
    pub container_id: String,
    /// Owner interface.
    pub ifname: String,
}

/// An open, locked store. The lock is released when this is dropped (the fd closes).
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

impl Store {
    /// Creates the directory if needed and takes the exclusive lock (blocking).
    pub fn lock(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io("create dir", dir))?;
        let path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("open lock", &path))?;
        rustix::fs::flock(lock.as_fd(), rustix::fs::FlockOperation::LockExclusive).map_err(
            |e| StoreError::Io {
                op: "flock",
                path: path.clone(),
                source: e.into(),
            },
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// Every complete record, plus the names of stale temporary files.
    pub fn scan(&self) -> Result<(Vec<Record>, Vec<PathBuf>), StoreError> {
        let mut records = Vec::new();
        let mut stale = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io("read dir", &self.dir))? {
            let entry = entry.map_err(io("read dir", &self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TMP_PREFIX) {
                stale.push(entry.path());
                continue;
            }
            let Ok(ip) = name.parse::<IpAddr>() else {
                continue;
            };
            let path = entry.path();
            let content = match fs::read_to_string(&path) {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io("read record", &path)(e)),
            };
            let mut lines = content.lines();
            let container_id = lines.next().unwrap_or_default().trim().to_string();
            let ifname = lines.next().unwrap_or_default().trim().to_string();
            records.push(Record {
                ip,
                container_id,
                ifname,
            });
        }
        Ok((records, stale))
    }

    fn record_path(&self, ip: IpAddr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    /// Publishes a record; `Ok(false)` when the address already has one.
    pub fn reserve(&self, rec: &Record) -> Result<bool, StoreError> {
        let tmp = self.dir.join(format!("{TMP_PREFIX}{}", rec.ip));
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io("create record", &tmp))?;
        let body = format!("{}\r\n{}", rec.container_id, rec.ifname);
        f.write_all(body.as_bytes())
            .map_err(io("write record", &tmp))?;
        f.sync_all().map_err(io("fsync record", &tmp))?;
        drop(f);
        let dst = self.record_path(rec.ip);
        let linked = match fs::hard_link(&tmp, &dst) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(io("publish record", &dst)(e));
            }
        };
        fs::remove_file(&tmp).map_err(io("remove temp record", &tmp))?;
        Ok(linked)
    }

    /// Removes a record; missing is fine.
    pub fn release(&self, ip: IpAddr) -> Result<(), StoreError> {
        remove_if_exists(&self.record_path(ip))
    }

    /// The last address handed out from range set `set`.
    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("{LAST_PREFIX}{set}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Records the hint; losing it only changes where the next search starts, so no fsync.
    pub fn set_last_reserved(&self, set: usize, ip: IpAddr) -> Result<(), StoreError> {
        let path = self.dir.join(format!("{LAST_PREFIX}{set}"));
        let tmp = self.dir.join(format!("{TMP_PREFIX}{LAST_PREFIX}{set}"));
        fs::write(&tmp, ip.to_string()).map_err(io("write hint", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("rename hint", &path))
    }
}

fn remove_if_exists(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", path)(e)),
        _ => Ok(()),
    }
}

/// One address handed to an attachment, with the range it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    /// The address.
    pub ip: IpAddr,
    /// Index of the range set.
    pub set: usize,
    /// The range (subnet, gateway).
    pub range: crate::config::Range,
}

/// Allocates one address per range set for `(container_id, ifname)`. Idempotent: an
/// attachment that already holds addresses gets the same ones back. On failure nothing new
/// stays allocated.
pub fn allocate(
    net: &Network,
    container_id: &str,
    ifname: &str,
    requested: &[IpAddr],
) -> Result<Vec<Allocated>, StoreError> {
    if net.range_sets.is_empty() {
        return Ok(Vec::new());
    }
    let store = Store::lock(&net.data_dir)?;
    let (records, _) = store.scan()?;
    let taken: HashSet<IpAddr> = records.iter().map(|r| r.ip).collect();
    let reserved: HashSet<IpAddr> = net.reserved.iter().copied().collect();
    let mine: Vec<IpAddr> = records
        .iter()
        .filter(|r| r.container_id == container_id && r.ifname == ifname)
        .map(|r| r.ip)
        .collect();
    let mut out = Vec::new();
    let mut fresh = Vec::new();
    let result = (|| {
        for (si, set) in net.range_sets.iter().enumerate() {
            let in_set = |ip: &IpAddr| set.iter().position(|r| *ip >= r.start && *ip <= r.end);
            if let Some((ip, ri)) = mine.iter().find_map(|ip| in_set(ip).map(|ri| (*ip, ri))) {
                out.push(Allocated {
                    ip,
                    set: si,
                    range: set[ri].clone(),
                });
                continue;
            }
            let wanted = requested.iter().find(|ip| in_set(ip).is_some());
            let (ip, ri) = match wanted {
                Some(&ip) => (ip, ipam::check_requested(set, &reserved, &taken, ip)?),
                None => {
                    let ip = ipam::pick(set, &reserved, &taken, store.last_reserved(si))?;
                    (ip, in_set(&ip).unwrap_or(0))
                }
            };
            let rec = Record {
                ip,
                container_id: container_id.to_string(),
                ifname: ifname.to_string(),
            };
            if !store.reserve(&rec)? {
                // Only possible if a record appeared outside the lock; treat as taken.
                return Err(IpamError::Unavailable {
                    ip,
                    reason: "already allocated",
                }
                .into());
            }
            fresh.push(ip);
            store.set_last_reserved(si, ip)?;
            out.push(Allocated {
                ip,
                set: si,
                range: set[ri].clone(),
            });
        }
        Ok(())
    })();
    if let Err(e) = result {
        for ip in fresh {
            let _ = store.release(ip);
        }
        return Err(e);
    }
    Ok(out)
}

/// The addresses recorded for an attachment (for CHECK).
pub fn lookup(net: &Network, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError> {
    if !net.data_dir.exists() {
        return Ok(Vec::new());
    }
    let store = Store::lock(&net.data_dir)?;
    let (records, _) = store.scan()?;
    Ok(records
        .into_iter()
        .filter(|r| r.container_id == container_id && r.ifname == ifname)
        .map(|r| r.ip)
        .collect())
}

/// Releases every address of an attachment. Idempotent.
pub fn release(net: &Network, container_id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError> {
    if !net.data_dir.exists() {
        return Ok(Vec::new());
    }
    let store = Store::lock(&net.data_dir)?;
    let (records, _) = store.scan()?;
    let mut freed = Vec::new();
    for r in records
        .iter()
        .filter(|r| r.container_id == container_id && r.ifname == ifname)
    {
        store.release(r.ip)?;
        freed.push(r.ip);
    }
    Ok(freed)
}

/// Releases every record whose attachment is not in `valid`, and stale temporary files.
/// Returns the released records.
pub fn gc(net: &Network, valid: &HashSet<Attachment>) -> Result<Vec<Record>, StoreError> {
    if !net.data_dir.exists() {
        return Ok(Vec::new());
    }
    let store = Store::lock(&net.data_dir)?;
    let (records, stale) = store.scan()?;
    for path in stale {
        remove_if_exists(&path)?;
    }
    let mut freed = Vec::new();
    for r in records {
        let key = Attachment {
            container_id: r.container_id.clone(),
            ifname: r.ifname.clone(),
        };
        if !valid.contains(&key) {
            store.release(r.ip)?;
            freed.push(r);
        }
    }
    Ok(freed)
}

/// Counts of what the store holds, per range set: (allocated, capacity capped at u64::MAX).
pub fn usage(net: &Network) -> Result<HashMap<usize, (u64, u64)>, StoreError> {
    let records = if net.data_dir.exists() {
        Store::lock(&net.data_dir)?.scan()?.0
    } else {
        Vec::new()
    };
    let mut out = HashMap::new();
    for (si, set) in net.range_sets.iter().enumerate() {
        let used = records
            .iter()
            .filter(|r| set.iter().any(|x| r.ip >= x.start && r.ip <= x.end))
            .count() as u64;
        let cap = set
            .iter()
            .fold(0u64, |acc, r| acc.saturating_add(range_size(r)));
        out.insert(si, (used, cap));
    }
    Ok(out)
}

fn range_size(r: &crate::config::Range) -> u64 {
    let (s, e) = match (r.start, r.end) {
        (IpAddr::V4(s), IpAddr::V4(e)) => (u128::from(u32::from(s)), u128::from(u32::from(e))),
        (IpAddr::V6(s), IpAddr::V6(e)) => (u128::from(s), u128::from(e)),
        _ => return 0,
    };
    // Minus the gateway, which is never handed out.
    u64::try_from((e - s + 1).saturating_sub(1)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(dir: &Path, ranges: &str) -> Network {
        let j = format!(
            r#"{{"cniVersion":"1.1.0","name":"t","type":"keel-cni","ipam":{{"ranges":{ranges},"dataDir":"{}"}}}}"#,
            dir.display()
        );
        crate::config::validate(crate::config::parse(j.as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn allocate_is_idempotent_and_release_frees() {
        let d = tempfile::tempdir().unwrap();
        let n = net(
            d.path(),
            r#"[[{"subnet":"10.0.0.0/24"}],[{"subnet":"fd00::/64"}]]"#,
        );
        let a = allocate(&n, "c1", "eth0", &[]).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].ip.to_string(), "10.0.0.2");
        assert_eq!(a[1].ip.to_string(), "fd00::2");
        assert_eq!(allocate(&n, "c1", "eth0", &[]).unwrap(), a);
        let b = allocate(&n, "c2", "eth0", &[]).unwrap();
        assert_eq!(b[0].ip.to_string(), "10.0.0.3");
        let content = fs::read_to_string(n.data_dir.join("10.0.0.3")).unwrap();
        assert_eq!(content, "c2\r\neth0");
        assert_eq!(release(&n, "c1", "eth0").unwrap().len(), 2);
        assert!(release(&n, "c1", "eth0").unwrap().is_empty());
        assert_eq!(lookup(&n, "c2", "eth0").unwrap().len(), 2);
    }

    #[test]
    fn failure_leaves_no_partial_allocation() {
        let d = tempfile::tempdir().unwrap();
        // v4 set has a single address; v6 fine. Second attachment fails on v4 first.
        let n = net(
            d.path(),
            r#"[[{"subnet":"fd00::/64"}],[{"subnet":"10.0.0.0/30"}]]"#,
        );
        allocate(&n, "c1", "eth0", &[]).unwrap();
        let e = allocate(&n, "c2", "eth0", &[]).unwrap_err();
        assert_eq!(e.code(), 100);
        assert!(
            lookup(&n, "c2", "eth0").unwrap().is_empty(),
            "v6 address of the failed ADD must be released"
        );
    }

    #[test]
    fn requested_address() {
        let d = tempfile::tempdir().unwrap();
        let n = net(d.path(), r#"[[{"subnet":"10.0.0.0/24"}]]"#);
        let want: IpAddr = "10.0.0.77".parse().unwrap();
        assert_eq!(allocate(&n, "c1", "eth0", &[want]).unwrap()[0].ip, want);
        assert_eq!(allocate(&n, "c2", "eth0", &[want]).unwrap_err().code(), 101);
    }

    #[test]
    fn gc_keeps_valid_and_removes_rest_and_tmp() {
        let d = tempfile::tempdir().unwrap();
        let n = net(d.path(), r#"[[{"subnet":"10.0.0.0/24"}]]"#);
        allocate(&n, "keep", "eth0", &[]).unwrap();
        allocate(&n, "leak", "eth0", &[]).unwrap();
        fs::write(n.data_dir.join(".tmp-10.0.0.9"), "half").unwrap();
        let valid: HashSet<Attachment> = [Attachment {
            container_id: "keep".into(),
            ifname: "eth0".into(),
        }]
        .into_iter()
        .collect();
        let freed = gc(&n, &valid).unwrap();
        assert_eq!(freed.len(), 1);
        assert_eq!(freed[0].container_id, "leak");
        assert!(!n.data_dir.join(".tmp-10.0.0.9").exists());
        assert_eq!(lookup(&n, "keep", "eth0").unwrap().len(), 1);
        let u = usage(&n).unwrap();
        assert_eq!(u[&0], (1, 253));
    }

    #[test]
    fn concurrent_allocations_never_collide() {
        let d = tempfile::tempdir().unwrap();
        let n = net(d.path(), r#"[[{"subnet":"10.0.0.0/24"}]]"#);
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let n = n.clone();
                std::thread::spawn(move || {
                    (0..10)
                        .map(|j| allocate(&n, &format!("c{i}-{j}"), "eth0", &[]).unwrap()[0].ip)
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<IpAddr> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let uniq: HashSet<_> = all.iter().collect();
        assert_eq!(uniq.len(), 80);
    }
}
