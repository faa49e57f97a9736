//! Status messages and heartbeats waiting for delivery: one JSON line per message, appended and
//! synced before the message counts as queued; removed (by an atomic rewrite) only after the MP
//! acknowledged it with 200. Each message has a UUID, so a batch sent again after a crash
//! between the acknowledgement and the rewrite is recognised by the MP and not stored twice.
//!
//! Other processes on the device may queue messages while `cmg client run` delivers them: every
//! append and every rewrite holds an advisory lock on `outbox.lock`, so a message appended while
//! the agent rewrites the queue is never lost.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use cmg_proto::mp::{MessageKind, StatusMessage};

use crate::LocalError;
use crate::state::{QUEUE_FILE, QUEUE_LOCK_FILE, unix_now, write_atomic};

/// The queue's lock, held until the returned file is dropped. (The queue file itself cannot
/// carry the lock: a rewrite replaces it with a new file.)
fn lock(state_dir: &Path) -> Result<File, LocalError> {
    let path = state_dir.join(QUEUE_LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| LocalError::io("open", &path, e))?;
    file.lock().map_err(|e| LocalError::io("lock", &path, e))?;
    Ok(file)
}

/// Appends a message and returns its ID.
pub fn enqueue(
    state_dir: &Path,
    kind: MessageKind,
    body: serde_json::Value,
) -> Result<String, LocalError> {
    let message = StatusMessage {
        id: uuid::Uuid::new_v4().to_string(),
        kind,
        time: unix_now(),
        body,
    };
    let path = state_dir.join(QUEUE_FILE);
    let mut line = serde_json::to_vec(&message).map_err(|e| LocalError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    line.push(b'\n');
    let _lock = lock(state_dir)?;
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        file.write_all(&line)?;
        file.sync_data()
    })();
    result.map_err(|e| LocalError::io("append to", &path, e))?;
    Ok(message.id)
}

/// The queued messages, oldest first. A line cut off by a crash while appending is skipped.
pub fn pending(state_dir: &Path) -> Result<Vec<StatusMessage>, LocalError> {
    let path = state_dir.join(QUEUE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LocalError::io("read", &path, e)),
    };
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Whether a message is waiting (a line cut off by a crash does not count).
pub(crate) fn has_pending(state_dir: &Path) -> bool {
    pending(state_dir).is_ok_and(|q| !q.is_empty())
}

/// Removes the acknowledged messages, keeping the order of the rest.
pub(crate) fn remove(state_dir: &Path, acked: &[String]) -> Result<(), LocalError> {
    let path = state_dir.join(QUEUE_FILE);
    let _lock = lock(state_dir)?;
    let rest: Vec<StatusMessage> = pending(state_dir)?
        .into_iter()
        .filter(|m| !acked.contains(&m.id))
        .collect();
    let mut text = Vec::new();
    for message in &rest {
        if let Ok(line) = serde_json::to_vec(message) {
            text.extend_from_slice(&line);
            text.push(b'\n');
        }
    }
    write_atomic(&path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_their_order_and_leave_only_when_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..3)
            .map(|i| {
                enqueue(
                    dir.path(),
                    MessageKind::Status,
                    serde_json::json!({ "n": i }),
                )
                .unwrap()
            })
            .collect();
        // A torn last line (crash while appending) is ignored.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(QUEUE_FILE))
            .unwrap()
            .write_all(b"{\"id\":\"x")
            .unwrap();
        let queued = pending(dir.path()).unwrap();
        assert_eq!(
            queued.iter().map(|m| &m.id).collect::<Vec<_>>(),
            ids.iter().collect::<Vec<_>>()
        );
        remove(dir.path(), &ids[..2]).unwrap();
        let left = pending(dir.path()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, ids[2]);
    }

    #[test]
    fn messages_queued_while_delivered_ones_are_removed_are_not_lost() {
        // One writer (another process on the device, say) queues while the agent keeps
        // removing what it delivered: every message leaves the queue exactly once.
        let dir = tempfile::tempdir().unwrap();
        let writer_dir = dir.path().to_path_buf();
        let writer = std::thread::spawn(move || {
            (0..100)
                .map(|i| {
                    enqueue(
                        &writer_dir,
                        MessageKind::Status,
                        serde_json::json!({ "n": i }),
                    )
                    .unwrap()
                })
                .collect::<Vec<_>>()
        });
        let mut delivered = Vec::new();
        loop {
            let done = writer.is_finished();
            let batch: Vec<String> = pending(dir.path())
                .unwrap()
                .into_iter()
                .map(|m| m.id)
                .collect();
            remove(dir.path(), &batch).unwrap();
            delivered.extend(batch);
            if done && pending(dir.path()).unwrap().is_empty() {
                break;
            }
        }
        let queued = writer.join().unwrap();
        assert_eq!(delivered, queued, "every message once, in order");
    }
}
