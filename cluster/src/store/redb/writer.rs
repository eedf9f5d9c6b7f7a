//! The redb store's single writer: a dedicated thread that owns every write transaction and
//! commits concurrent writes together (group commit).
//!
//! Callers queue a [`Change`] and await its answer. The thread takes everything queued, applies
//! the changes in queue order inside one transaction (each checks its own precondition against
//! the state the earlier ones left, and takes the next revision only when it applies), commits
//! once with `Durability::Immediate`, publishes the events in revision order, and only then
//! answers. A change refused by its precondition fails alone; storage failing fails the whole
//! batch, which was not committed. So one fsync covers as many writes as arrived during the
//! previous one, and a write is acknowledged only once it is on disk.
//!
//! Compaction steps run on the same thread between batches, so no other write transaction
//! exists and nothing else hands out revisions.
//!
//! Must not hold the store alive: the thread ends when the last [`Writer`] (held by the
//! `RedbStore`) is dropped and the queue is drained.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::write::{self, Applied, Change, Tables};
use super::{Inner, RedbError};
use crate::store::{StoreError, WatchEvent};

/// The most changes one transaction takes. Above the watch buffer, one batch's events would
/// overflow it and send every live watcher back to reading the history; the cap also bounds how
/// long the first write of a burst waits for the commit.
const MAX_BATCH: usize = 512;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What the writer thread is asked to do.
enum Job {
    Write(Change, Reply<Applied>),
    /// Compact through `target`, one `compact_batch` step per turn.
    Compact(i64, Reply<()>),
}

/// The queue into the writer thread. Dropping it waits for the thread to finish what is queued
/// and let go of the file, so the file can be opened again (by this process or a child) as soon
/// as the store is dropped. That wait is one commit at most: no caller is left awaiting a write
/// once the store can be dropped, so only writes whose callers gave up can still be queued.
#[derive(Debug)]
pub(super) struct Writer {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(path = %self.path.display(), "store writer thread panicked");
        }
    }
}

impl Writer {
    /// Starts the writer thread of `inner`, with batches of at most `batch` changes.
    pub(super) fn start(inner: Arc<Inner>, batch: usize) -> Result<Writer, StoreError> {
        let (tx, rx) = mpsc::channel();
        let path = inner.path.clone();
        let batch = batch.clamp(1, MAX_BATCH);
        let thread = std::thread::Builder::new()
            .name("keel-store-writer".into())
            .spawn(move || run(&inner, &rx, batch))
            .map_err(|source| RedbError::Spawn {
                path: path.clone(),
                source,
            })?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
            path,
        })
    }

    /// Applies `change` durably; answers after the commit.
    pub(super) async fn write(&self, change: Change) -> Result<Applied, StoreError> {
        let op = change.op();
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Write(change, reply), op)?;
        answer.await.map_err(|_| self.stopped(op))?
    }

    /// Compacts through `target`.
    pub(super) async fn compact(&self, target: i64) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.submit(Job::Compact(target, reply), "compact")?;
        answer.await.map_err(|_| self.stopped("compact"))?
    }

    fn submit(&self, job: Job, op: &'static str) -> Result<(), StoreError> {
        let tx = self.tx.as_ref().ok_or_else(|| self.stopped(op))?;
        tx.send(job).map_err(|_| self.stopped(op))
    }

    /// The thread is gone (it panicked): the write may or may not have been committed.
    fn stopped(&self, op: &'static str) -> StoreError {
        StoreError::Redb(RedbError::WriterStopped {
            path: self.path.clone(),
            op,
        })
    }
}

/// The thread's loop: ends when every sender is gone and the queue is empty.
fn run(inner: &Inner, rx: &mpsc::Receiver<Job>, batch: usize) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match rx.recv() {
                Ok(job) => queue.push_back(job),
                Err(mpsc::RecvError) => return,
            }
        }
        queue.extend(rx.try_iter());
        let first = match queue.pop_front() {
            Some(Job::Write(change, reply)) => (change, reply),
            Some(Job::Compact(target, reply)) => {
                match write::compact_step(inner, target) {
                    // Writes queued meanwhile go first, then the next step.
                    Ok(true) => queue.push_back(Job::Compact(target, reply)),
                    done => {
                        // The caller may have given up waiting; the outcome stands either way.
                        let _ = reply.send(done.map(|_| ()));
                    }
                }
                continue;
            }
            None => continue,
        };
        let mut writes = Vec::with_capacity(queue.len().min(batch) + 1);
        writes.push(first);
        while writes.len() < batch {
            match queue.pop_front() {
                Some(Job::Write(change, reply)) => writes.push((change, reply)),
                Some(compact @ Job::Compact(..)) => {
                    queue.push_front(compact);
                    break;
                }
                None => break,
            }
        }
        commit_batch(inner, writes);
    }
}

/// The batch so far: the replies of the changes taken, and the answers and events of those that
/// were applied or refused (one fewer answer than replies when storage failed on the last one).
#[derive(Default)]
struct Staged {
    replies: Vec<Reply<Applied>>,
    answers: Vec<Result<Applied, StoreError>>,
    events: Vec<WatchEvent>,
}

/// Applies `writes` in one transaction, commits, publishes, answers.
fn commit_batch(inner: &Inner, writes: Vec<(Change, Reply<Applied>)>) {
    let mut staged = Staged::default();
    let mut pending = writes.into_iter();
    let outcome = write::begin(inner, "begin write").and_then(|txn| {
        match apply_batch(inner, &txn, &mut pending, &mut staged) {
            Ok(true) => txn.commit().map_err(inner.fail("commit")),
            Ok(false) => {
                // Every change was refused: nothing to make durable, no fsync.
                let _ = txn.abort();
                Ok(())
            }
            Err(e) => {
                // Nothing was committed; an abort failure would only repeat the cause.
                let _ = txn.abort();
                Err(e)
            }
        }
    });
    let Staged {
        replies,
        answers,
        events,
    } = staged;
    match outcome {
        Ok(()) => {
            tracing::trace!(
                writes = replies.len(),
                applied = events.len(),
                "write batch"
            );
            for event in events {
                inner.hub.publish(event);
            }
            for (reply, answer) in replies.into_iter().zip(answers) {
                // The caller may have given up waiting; the write stands either way.
                let _ = reply.send(answer);
            }
        }
        Err(cause) => {
            tracing::error!(error = %cause, "store write batch failed");
            let cause = Arc::new(cause);
            let replies = replies.into_iter().chain(pending.map(|(_, reply)| reply));
            for reply in replies {
                let _ = reply.send(Err(StoreError::Redb(RedbError::Batch {
                    path: inner.path.clone(),
                    source: Arc::clone(&cause),
                })));
            }
        }
    }
}

/// Applies the changes of `pending` in order at consecutive revisions, staging their replies,
/// answers and events; true when at least one applied. On a storage error the rest stay in
/// `pending`, and the caller fails them all.
fn apply_batch(
    inner: &Inner,
    txn: &redb::WriteTransaction,
    pending: &mut impl Iterator<Item = (Change, Reply<Applied>)>,
    staged: &mut Staged,
) -> Result<bool, StoreError> {
    let mut tables = Tables::open(inner, txn)?;
    let start = tables.revision(inner)?;
    let mut revision = start;
    for (change, reply) in pending.by_ref() {
        staged.replies.push(reply);
        match write::apply(inner, &mut tables, change, revision + 1)? {
            Ok((applied, event)) => {
                revision += 1;
                staged.answers.push(Ok(applied));
                staged.events.push(event);
            }
            Err(refused) => staged.answers.push(Err(refused)),
        }
    }
    if revision == start {
        return Ok(false);
    }
    tables.set_revision(inner, revision)?;
    Ok(true)
}
