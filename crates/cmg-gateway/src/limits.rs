//! The process's open-file limit, which caps how many devices a gateway instance holds at once:
//! every device connection is a file descriptor. Many systems start a service with a soft limit
//! of 1,024 while allowing far more, which would refuse devices beyond about a thousand; the
//! gateway raises the soft limit to the hard one when it starts (as Go's runtime does for every
//! program), and says where it stands. Accept failures, of devices and of tunnels alike, are
//! logged at most once a minute, with the count of those not logged, so that a gateway at its
//! limit does not flood its log.

use std::io;
use std::time::{Duration, Instant};

/// At most one line per this long about device connections that could not be accepted.
pub(crate) const ACCEPT_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Raises the soft open-file limit to the hard one, best effort; returns the soft limit now in
/// force (`None` where it cannot be read).
pub(crate) fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a plain struct that outlives both calls, which only read or fill it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Some(limit.rlim_cur)
}

/// Connections an accept loop could not take, turned into log lines at most once per
/// [`ACCEPT_FAILURE_LOG_INTERVAL`].
#[derive(Debug)]
pub(crate) struct AcceptFailures {
    /// What the loop accepts, as the log line names it ("device connection").
    what: &'static str,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    pub fn new(what: &'static str) -> AcceptFailures {
        AcceptFailures {
            what,
            last_logged: None,
            unlogged: 0,
        }
    }

    /// Records a failure at `now`; returns the line to log, or `None` when one was logged less
    /// than an interval ago.
    pub fn record(&mut self, now: Instant, error: &io::Error) -> Option<String> {
        if self
            .last_logged
            .is_some_and(|t| now.saturating_duration_since(t) < ACCEPT_FAILURE_LOG_INTERVAL)
        {
            self.unlogged += 1;
            return None;
        }
        let more = match std::mem::take(&mut self.unlogged) {
            0 => String::new(),
            n => format!(" ({n} more since the last such line)"),
        };
        self.last_logged = Some(now);
        let action = if matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
            "; the open-file limit is reached, so new connections are refused until others \
             close: raise it (LimitNOFILE= in the service unit, or ulimit -n) or add gateway \
             instances"
        } else {
            ""
        };
        Some(format!(
            "Cannot accept a {}: {error}{more}{action}",
            self.what
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let now = raise_open_file_limit().expect("the limit can be read");
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(now, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }

    #[test]
    fn accept_failures_are_logged_once_a_minute_with_the_count_left_out() {
        let mut failures = AcceptFailures::new("device connection");
        let start = Instant::now();
        let full = io::Error::from_raw_os_error(libc::EMFILE);

        let first = failures.record(start, &full).expect("the first is logged");
        assert!(
            first.starts_with("Cannot accept a device connection: "),
            "{first}"
        );
        assert!(first.contains("open-file limit is reached"), "{first}");
        assert!(first.contains("LimitNOFILE"), "{first}");
        assert!(!first.contains("more since"), "{first}");

        for s in [1, 30, 59] {
            assert_eq!(failures.record(start + Duration::from_secs(s), &full), None);
        }
        let next = failures
            .record(start + ACCEPT_FAILURE_LOG_INTERVAL, &full)
            .expect("a minute later, one more line");
        assert!(next.contains("(3 more since the last such line)"), "{next}");

        // Other failures get no advice about the limit.
        let other = io::Error::from_raw_os_error(libc::ECONNABORTED);
        let line = failures
            .record(start + 3 * ACCEPT_FAILURE_LOG_INTERVAL, &other)
            .expect("logged");
        assert!(!line.contains("open-file limit"), "{line}");
        assert!(!line.contains("more since"), "{line}");
    }
}
