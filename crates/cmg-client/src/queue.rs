//! Status messages and heartbeats waiting for delivery: one JSON line per message, appended and
//! synced before the message counts as queued; removed (by an atomic rewrite) only after the MP
//! acknowledged it with 200. Each message has a UUID, so a batch sent again after a crash
//! between the acknowledgement and the rewrite is recognised by the MP and not stored twice.

use std::io::Write;
use std::path::Path;

use cmg_proto::mp::{MessageKind, StatusMessage};

use crate::LocalError;
use crate::state::{QUEUE_FILE, unix_now, write_atomic};

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

/// Removes the acknowledged messages, keeping the order of the rest.
pub(crate) fn remove(state_dir: &Path, acked: &[String]) -> Result<(), LocalError> {
    let path = state_dir.join(QUEUE_FILE);
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
}
