//! Crash tests: the server is SIGKILLed in the middle of a stream of writes and started again.
//! Every acknowledged write must be there, the store must open cleanly and pass its consistency
//! check, and revisions must continue upwards.
//!
//! For redb the writer is this test binary re-executed as a child (`redb_writer_child`, which
//! does nothing unless `KEEL_STORE_CHILD_DIR` is set): it prints `ACK <key> <revision>` after
//! each create returns. For etcd the etcd process itself is killed under a writing client.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keel_cluster::store::{EtcdStore, ListOptions, RedbOptions, RedbStore, Store};
use support::{b, etcd_store};

/// Set in the child: the data dir to write into.
const CHILD_DIR: &str = "KEEL_STORE_CHILD_DIR";
/// Set in the child: the key prefix of this round.
const CHILD_PREFIX: &str = "KEEL_STORE_CHILD_PREFIX";
/// Acks the parent waits for before killing.
const ACKS_BEFORE_KILL: usize = 150;
/// Crash rounds on the same file.
const ROUNDS: usize = 5;

/// The writer half of `redb_survives_sigkill_mid_write`; a no-op in a normal test run.
#[test]
fn redb_writer_child() {
    let (Some(dir), Some(prefix)) = (
        std::env::var_os(CHILD_DIR),
        std::env::var(CHILD_PREFIX).ok(),
    ) else {
        return;
    };
    let store = RedbStore::open(Path::new(&dir), RedbOptions::default()).expect("child: open");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("child: runtime");
    let value = b(&"v".repeat(512));
    let mut out = std::io::stdout().lock();
    // Bounded, so an orphaned child (its parent died) does not write forever.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut i = 0u64;
    while Instant::now() < deadline {
        let key = format!("{prefix}{i:08}");
        let kv = rt
            .block_on(store.create(key.as_bytes(), value.clone()))
            .expect("child: create");
        writeln!(out, "ACK {key} {}", kv.mod_revision).expect("child: stdout");
        out.flush().expect("child: flush");
        i += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_survives_sigkill_mid_write() {
    let dir = tempfile::Builder::new()
        .prefix("keel-store-crash-")
        .tempdir()
        .expect("temp dir");
    let exe = std::env::current_exe().expect("test binary path");
    let mut last_revision = 0;
    for round in 0..ROUNDS {
        let prefix = format!("/crash/{round}/");
        let acked = tokio::task::spawn_blocking({
            let exe = exe.clone();
            let dir = dir.path().to_path_buf();
            let prefix = prefix.clone();
            move || run_and_kill_child(&exe, &dir, &prefix)
        })
        .await
        .expect("child task");
        assert!(
            acked.len() >= ACKS_BEFORE_KILL,
            "round {round}: {} acks",
            acked.len()
        );

        let store = RedbStore::open_async(dir.path().to_path_buf(), RedbOptions::default())
            .await
            .unwrap_or_else(|e| panic!("round {round}: reopen after SIGKILL: {e}"));
        store
            .verify()
            .await
            .unwrap_or_else(|e| panic!("round {round}: consistency after SIGKILL: {e}"));
        let listed = store
            .list(prefix.as_bytes(), ListOptions::default())
            .await
            .expect("list");
        let present: BTreeMap<String, i64> = listed
            .items
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    kv.mod_revision,
                )
            })
            .collect();
        for (key, revision) in &acked {
            assert_eq!(
                present.get(key),
                Some(revision),
                "round {round}: acknowledged {key}@{revision} lost"
            );
        }
        // At most the one write in flight at the kill committed without its ack.
        let unacked: Vec<_> = present
            .iter()
            .filter(|(k, _)| !acked.contains_key(*k))
            .collect();
        assert!(
            unacked.len() <= 1,
            "round {round}: {} keys for {} acks; unacknowledged: {unacked:?}; last acks: {:?}",
            present.len(),
            acked.len(),
            acked.iter().rev().take(3).collect::<Vec<_>>()
        );
        let max_acked = acked.values().copied().max().unwrap_or(0);
        assert!(
            max_acked > last_revision,
            "round {round}: revisions went backwards"
        );
        let after = store
            .create(format!("{prefix}after").as_bytes(), b("x"))
            .await
            .expect("write after restart");
        assert!(after.mod_revision > max_acked);
        assert_eq!(after.mod_revision, listed.revision + 1);
        last_revision = after.mod_revision;
    }
}

/// Runs the writer child until it acked [`ACKS_BEFORE_KILL`] writes, SIGKILLs it, and returns
/// every ack it printed (also those still in the pipe).
fn run_and_kill_child(exe: &Path, dir: &Path, prefix: &str) -> BTreeMap<String, i64> {
    let mut child = KillOnDrop(
        Command::new(exe)
            .args([
                "--exact",
                "redb_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir)
            .env(CHILD_PREFIX, prefix)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn writer child"),
    );
    let stdout = child.0.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest's "test redb_writer_child ... " may precede the first ack on its line.
            if let Some((_, ack)) = line.split_once("ACK ")
                && tx.send(ack.to_string()).is_err()
            {
                break;
            }
        }
    });
    let mut acked = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < ACKS_BEFORE_KILL {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ack) => record(&mut acked, &ack),
            Err(e) => panic!("writer child: {} acks, then {e}", acked.len()),
        }
    }
    // SIGKILL mid-stream: the child is writing as fast as it can.
    child.0.kill().expect("SIGKILL writer child");
    child.0.wait().expect("reap writer child");
    reader.join().expect("stdout reader");
    for ack in rx.try_iter() {
        record(&mut acked, &ack);
    }
    acked
}

/// Kills and reaps the child when the test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Fails only when the child is already gone; wait reaps it either way.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn record(acked: &mut BTreeMap<String, i64>, ack: &str) {
    let (key, revision) = ack.rsplit_once(' ').expect("ACK <key> <revision>");
    acked.insert(key.to_string(), revision.parse().expect("revision"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_survives_sigkill_mid_write() {
    let (store, mut etcd) = etcd_store().await;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { write_until_failure(&store).await })
    };
    // Let the writes run, then pull the plug under them.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = store
            .list(b"/crash/", ListOptions::default())
            .await
            .expect("list")
            .items
            .len();
        if count >= ACKS_BEFORE_KILL {
            break;
        }
        assert!(Instant::now() < deadline, "only {count} writes in 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    etcd.kill();
    let acked = writer.await.expect("writer task");
    assert!(acked.len() >= ACKS_BEFORE_KILL);
    tokio::task::block_in_place(|| etcd.restart())
        .unwrap_or_else(|e| panic!("restart etcd: {e:#}\n{}", etcd.log()));

    let store = EtcdStore::connect(&[etcd.endpoint()])
        .await
        .expect("reconnect");
    let listed = store
        .list(b"/crash/", ListOptions::default())
        .await
        .expect("list after restart");
    let present: BTreeMap<String, i64> = listed
        .items
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                kv.mod_revision,
            )
        })
        .collect();
    for (key, revision) in &acked {
        assert_eq!(
            present.get(key),
            Some(revision),
            "acknowledged {key}@{revision} lost"
        );
    }
    assert!(present.len() <= acked.len() + 1);
    let max_acked = acked.values().copied().max().unwrap_or(0);
    let after = store
        .create(b"/crash/after", b("x"))
        .await
        .expect("write after restart");
    assert!(after.mod_revision > max_acked);
}

/// Creates keys one after the other until a write fails; returns the acknowledged ones.
async fn write_until_failure(store: &EtcdStore) -> BTreeMap<String, i64> {
    let mut acked = BTreeMap::new();
    let value = b(&"v".repeat(512));
    for i in 0u64.. {
        let key = format!("/crash/{i:08}");
        let write = store.create(key.as_bytes(), value.clone());
        match tokio::time::timeout(Duration::from_secs(10), write).await {
            Ok(Ok(kv)) => {
                acked.insert(key, kv.mod_revision);
            }
            Ok(Err(_)) | Err(_) => break,
        }
    }
    acked
}
