//! Resolves a container user (`name`, `uid`, `name:group`, `uid:gid`) to ids with the image's
//! own /etc/passwd and /etc/group, as containerd and runc do.
//!
//! Parsing and resolution are pure; [`read_rootfs_file`] is the only door to the filesystem and
//! reads inside the mounted rootfs with `openat2(RESOLVE_IN_ROOT)`, so a symlinked /etc/passwd
//! cannot point at the host's. It must not guess: a name that is not in the files is an error.

use std::io::Read;
use std::path::Path;

/// What went wrong resolving a user.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user {user:?}: no such user in the image's /etc/passwd")]
    UnknownUser { user: String },
    #[error("group {group:?}: no such group in the image's /etc/group")]
    UnknownGroup { group: String },
    #[error("user {user:?}: invalid user specification")]
    Invalid { user: String },
    #[error("read {path} in the container rootfs: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The ids a container process runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Groups from /etc/group that list the user by name, sorted, without `gid`.
    pub additional_gids: Vec<u32>,
    /// The user's home from /etc/passwd (for `HOME`), if it has an entry.
    pub home: Option<String>,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 || l.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 || l.starts_with('#') {
            return None;
        }
        Some(GroupEntry {
            name: f[0],
            gid: f[2].parse().ok()?,
            members: f[3].split(',').filter(|m| !m.is_empty()).collect(),
        })
    })
}

/// Resolves `spec` (empty = root) against the image's passwd and group files (absent = empty).
pub fn resolve(
    spec: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<ResolvedUser, UserError> {
    let passwd = passwd.unwrap_or("");
    let group = group.unwrap_or("");
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if group_part.is_some_and(|g| g.is_empty() || g.contains(':')) {
        return Err(UserError::Invalid {
            user: spec.to_string(),
        });
    }
    let user_part = if user_part.is_empty() { "0" } else { user_part };

    let (uid, entry) = match user_part.parse::<u32>() {
        Ok(uid) => (uid, passwd_entries(passwd).find(|e| e.uid == uid)),
        Err(_) => {
            let e = passwd_entries(passwd)
                .find(|e| e.name == user_part)
                .ok_or_else(|| UserError::UnknownUser {
                    user: user_part.to_string(),
                })?;
            (e.uid, Some(e))
        }
    };
    let gid = match group_part {
        None => entry.as_ref().map(|e| e.gid).unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::UnknownGroup {
                    group: g.to_string(),
                })?,
        },
    };
    let mut additional_gids: Vec<u32> = match &entry {
        Some(e) => group_entries(group)
            .filter(|g| g.members.contains(&e.name) && g.gid != gid)
            .map(|g| g.gid)
            .collect(),
        None => Vec::new(),
    };
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home: entry.map(|e| e.home.to_string()),
    })
}

/// Reads `rel` (like `etc/passwd`) inside `rootfs`, resolving every component as if `rootfs`
/// were `/`. A missing file is `None`.
pub fn read_rootfs_file(rootfs: &Path, rel: &str) -> Result<Option<String>, UserError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let err = |e: std::io::Error| UserError::Read {
        path: rel.to_string(),
        source: e,
    };
    let root = rustix::fs::open(
        rootfs,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| err(e.into()))?;
    let fd = match rustix::fs::openat2(
        &root,
        rel,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(err(e.into())),
    };
    let mut text = String::new();
    // A passwd file bigger than this is not one we want to parse.
    std::fs::File::from(fd)
        .take(4 << 20)
        .read_to_string(&mut text)
        .map_err(err)?;
    Ok(Some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
        app:x:1000:1000:app:/home/app:/bin/sh\n\
        broken line\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app,root\nstaff:x:50:app\napp:x:1000:\n";

    #[test]
    fn root_by_default() {
        let u = resolve("", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((u.uid, u.gid), (0, 0));
        assert_eq!(u.additional_gids, vec![10]);
        assert_eq!(u.home.as_deref(), Some("/root"));
    }

    #[test]
    fn names_resolve_with_groups() {
        let u = resolve("app", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.additional_gids, vec![10, 50]);
        let u = resolve("app:staff", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 50));
        assert_eq!(u.additional_gids, vec![10]);
    }

    #[test]
    fn numeric_ids_need_no_entry() {
        let u = resolve("1234:99", None, None).unwrap();
        assert_eq!((u.uid, u.gid), (1234, 99));
        assert!(u.home.is_none());
        let u = resolve("1000", Some(PASSWD), None).unwrap();
        assert_eq!(u.gid, 1000);
    }

    #[test]
    fn unknown_names_fail() {
        assert!(matches!(
            resolve("nobody", Some(PASSWD), Some(GROUP)),
            Err(UserError::UnknownUser { .. })
        ));
        assert!(matches!(
            resolve("app:nogroup", Some(PASSWD), Some(GROUP)),
            Err(UserError::UnknownGroup { .. })
        ));
        assert!(matches!(
            resolve("app:", Some(PASSWD), Some(GROUP)),
            Err(UserError::Invalid { .. })
        ));
    }

    #[test]
    fn rootfs_reads_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        // An absolute symlink resolves inside the rootfs, not on the host.
        std::os::unix::fs::symlink("/inner", dir.path().join("etc/passwd")).unwrap();
        std::fs::write(dir.path().join("inner"), "x:x:5:5::/:/bin/sh\n").unwrap();
        let t = read_rootfs_file(dir.path(), "etc/passwd").unwrap().unwrap();
        assert!(t.starts_with("x:x:5"));
        assert!(read_rootfs_file(dir.path(), "etc/group").unwrap().is_none());
    }
}
