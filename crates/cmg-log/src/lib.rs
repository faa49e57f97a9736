//! Log files the way ConfigMgr admins read them (DESIGN §10): one file per component
//! (`MP_RegistrationManager.log`, `CCM_STS.log`, …) in the CMTrace format that CMTrace and
//! OneTrace open, rolled over by size to `<name>.lo_`.
//!
//! A role opens one [`ComponentLog`] per file in its own log directory and writes through it;
//! each line also goes to `tracing` (target `cmg`, field `component`), so it reaches stderr too.
//! Logs belong to the role instance, not to the process, so several roles (or several test
//! sites) in one process each write their own files.
//!
//! This crate must not decide what is logged or filter secrets: callers never pass tokens, keys
//! or passwords to a log macro.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Sends `tracing` diagnostics to stderr, at the level `CMG_LOG` gives (an `EnvFilter`
/// directive such as `info` or `cmg_gateway=debug`; default `warn`), so that stdout carries only
/// what scripts parse. The `cmg` binary calls it once at start; the gateway bench calls it too, so
/// that it pays for diagnostics what a deployed role pays (without any subscriber, `tracing` hands
/// every span of the HTTP/2 library to the `log` crate instead, which costs more).
pub fn init_stderr_diagnostics() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CMG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A second call (a bench re-entering, say) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Roll a file over when it passes this size (ConfigMgr's default is far smaller; disks grew).
pub const DEFAULT_MAX_BYTES: u64 = 5 * 1024 * 1024;

/// CMTrace severity: 1 information, 2 warning, 3 error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info = 1,
    Warning = 2,
    Error = 3,
}

/// One component's log file. Cheap to clone; writes are serialised and flushed per line so a
/// crash loses nothing already logged.
#[derive(Clone, Debug)]
pub struct LogFile {
    component: Arc<str>,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    writer: Option<BufWriter<File>>,
    size: u64,
    max_bytes: u64,
}

impl LogFile {
    /// Opens (appending) `<dir>/<component>.log`, creating the directory if needed.
    pub fn open(dir: &Path, component: &str, max_bytes: u64) -> io::Result<LogFile> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{component}.log"));
        let (writer, size) = open_append(&path)?;
        Ok(LogFile {
            component: component.into(),
            inner: Arc::new(Mutex::new(Inner {
                path,
                writer: Some(writer),
                size,
                max_bytes,
            })),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    /// Appends one CMTrace line. A failing disk must not take the service down, so I/O errors
    /// are reported once on stderr and the line is dropped.
    pub fn write(&self, severity: Severity, message: &str) {
        let line = format_line(
            message,
            &self.component,
            severity,
            time::OffsetDateTime::now_utc(),
        );
        let mut inner = self.lock();
        if let Err(e) = inner.append(line.as_bytes()) {
            eprintln!("cannot write {}: {e}", inner.path.display());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a usable file; keep logging.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn append(&mut self, line: &[u8]) -> io::Result<()> {
        if self.size + line.len() as u64 > self.max_bytes && self.size > 0 {
            self.roll_over()?;
        }
        let writer = match &mut self.writer {
            Some(w) => w,
            None => self.writer.insert(open_append(&self.path)?.0),
        };
        writer.write_all(line)?;
        writer.flush()?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// `X.log` becomes `X.lo_` (replacing an older one), as ConfigMgr does.
    fn roll_over(&mut self) -> io::Result<()> {
        self.writer = None;
        std::fs::rename(&self.path, self.path.with_extension("lo_"))?;
        self.writer = Some(open_append(&self.path)?.0);
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> io::Result<(BufWriter<File>, u64)> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let size = file.metadata()?.len();
    Ok((BufWriter::new(file), size))
}

/// One CMTrace line, e.g.
/// `<![LOG[text]LOG]!><time="12:28:04.123+000" date="11-25-2026" component="CCM_STS" context="" type="1" thread="3" file="">`.
/// Times are UTC, so the offset is `+000` minutes.
pub fn format_line(
    message: &str,
    component: &str,
    severity: Severity,
    at: time::OffsetDateTime,
) -> String {
    // The closing marker inside a message would end the record early in a viewer.
    let message = message.replace("]LOG]!>", "]LOG]>");
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "<![LOG[{message}]LOG]!><time=\"{:02}:{:02}:{:02}.{:03}+000\" date=\"{:02}-{:02}-{:04}\" component=\"{component}\" context=\"\" type=\"{}\" thread=\"{}\" file=\"\">\n",
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond(),
        u8::from(at.month()),
        at.day(),
        at.year(),
        severity as u8,
        thread_number(),
    )
}

/// An error with its causes, for a log line or a message an admin reads: `connection error:
/// Connection reset by peer (os error 104)`, where the error's own text would stop at
/// `connection error` (hyper, like many libraries, keeps the cause out of its `Display`).
/// A cause already in the text so far is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn thread_number() -> u64 {
    // ThreadId has no stable numeric accessor; its Debug form is `ThreadId(N)`.
    let id = format!("{:?}", std::thread::current().id());
    id.trim_start_matches("ThreadId(")
        .trim_end_matches(')')
        .parse()
        .unwrap_or(0)
}

/// One component's log (e.g. `CCM_STS`): its CMTrace file plus an echo to `tracing`.
#[derive(Clone, Debug)]
pub struct ComponentLog {
    file: LogFile,
}

impl ComponentLog {
    /// Opens (appending) `<dir>/<component>.log`.
    pub fn open(dir: &Path, component: &str) -> io::Result<Self> {
        Ok(ComponentLog {
            file: LogFile::open(dir, component, DEFAULT_MAX_BYTES)?,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.file.path()
    }

    pub fn info(&self, message: &str) {
        tracing::info!(target: "cmg", component = %self.file.component, "{message}");
        self.file.write(Severity::Info, message);
    }

    pub fn warn(&self, message: &str) {
        tracing::warn!(target: "cmg", component = %self.file.component, "{message}");
        self.file.write(Severity::Warning, message);
    }

    pub fn error(&self, message: &str) {
        tracing::error!(target: "cmg", component = %self.file.component, "{message}");
        self.file.write(Severity::Error, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{text}")]
    struct Layer {
        text: &'static str,
        #[source]
        cause: Option<Box<Layer>>,
    }

    fn layer(text: &'static str, cause: Option<Layer>) -> Layer {
        Layer {
            text,
            cause: cause.map(Box::new),
        }
    }

    #[test]
    fn an_error_chain_names_every_cause_once() {
        let reset = layer("Connection reset by peer (os error 104)", None);
        assert_eq!(
            error_chain(&layer("connection error", Some(reset))),
            "connection error: Connection reset by peer (os error 104)"
        );
        // A wrapper that already quotes its cause does not get it twice.
        let eof = layer("unexpected end of file", None);
        let quoted = layer("TLS: unexpected end of file", Some(eof));
        assert_eq!(
            error_chain(&layer("cannot connect", Some(quoted))),
            "cannot connect: TLS: unexpected end of file"
        );
        assert_eq!(error_chain(&layer("alone", None)), "alone");
    }

    #[test]
    fn lines_follow_the_cmtrace_format() {
        let at = time::macros::datetime!(2026-11-25 09:05:03.042 UTC);
        let line = format_line(
            "Client is registered",
            "ClientIDManagerStartup",
            Severity::Warning,
            at,
        );
        assert!(line.starts_with("<![LOG[Client is registered]LOG]!><time=\"09:05:03.042+000\" date=\"11-25-2026\" component=\"ClientIDManagerStartup\" context=\"\" type=\"2\" thread=\""));
        assert!(line.ends_with("\" file=\"\">\n"));
        let tricky = format_line("a]LOG]!>b", "X", Severity::Info, at);
        assert_eq!(tricky.matches("]LOG]!>").count(), 1);
    }

    #[test]
    fn component_logs_write_their_own_file_with_severity() {
        let dir = tempfile::tempdir().unwrap();
        let sts = ComponentLog::open(dir.path(), "CCM_STS").unwrap();
        let auth = ComponentLog::open(dir.path(), "ClientAuth").unwrap();
        sts.info("Token renewed for GUID:1");
        auth.error("Refused: expired");
        auth.warn("Refused: blocked");
        let sts = std::fs::read_to_string(dir.path().join("CCM_STS.log")).unwrap();
        assert!(
            sts.starts_with("<![LOG[Token renewed for GUID:1]LOG]!>"),
            "{sts}"
        );
        assert!(sts.contains("component=\"CCM_STS\"") && sts.contains("type=\"1\""));
        let auth = std::fs::read_to_string(dir.path().join("ClientAuth.log")).unwrap();
        assert_eq!(auth.lines().count(), 2);
        assert!(
            auth.contains("Refused: expired")
                && auth.contains("type=\"3\"")
                && auth.contains("type=\"2\"")
        );
        assert!(!sts.contains("Refused"));
    }

    #[test]
    fn files_roll_over_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::open(dir.path(), "CMGService", 400).unwrap();
        for i in 0..10 {
            log.write(Severity::Info, &format!("line {i}"));
        }
        let current = std::fs::read_to_string(dir.path().join("CMGService.log")).unwrap();
        let rolled = std::fs::read_to_string(dir.path().join("CMGService.lo_")).unwrap();
        assert!(current.len() <= 400 && !rolled.is_empty());
        assert!(current.contains("line 9"));
        assert!(!current.contains("line 0"));
    }
}
