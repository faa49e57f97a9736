//! What both ends of the tunnel (DESIGN §6) share about driving its one HTTP/2 connection:
//! [`drive`] polls it so that the requests (at the gateway) or answers (at the connection point)
//! that many devices' tasks hand it at about the same time leave in one write.
//!
//! This crate owns only that scheduling choice. It must not know HTTP, TLS or the roles: the
//! gateway and the connection point keep their own settings, time-outs and logs.
//!
//! # Why
//!
//! A tunnel carries every device's request through one connection task. Each device task that
//! hands it a request wakes it, and Tokio runs a task woken that way next, on the same thread
//! (its "LIFO slot"), so the connection task wrote each request as soon as it was handed over:
//! one `writev` system call and one TLS record per request and per answer, however busy the
//! tunnel. [`drive`] lets a woken connection wait until its thread has run every other task it
//! has ready, then writes what they all handed over. On a busy tunnel that is several requests
//! per write; on an idle one the thread has nothing else to run, so nothing waits. A thread that
//! never runs dry still polls it every few dozen tasks (Tokio's event interval, 61), when it
//! checks for I/O: the wait is bounded.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// Drives `connection` (an HTTP/2 client or server connection, or any future) to completion,
/// returning its output; each wake-up is deferred until the thread has nothing else ready.
///
/// Cancel-safe: dropping the returned future leaves `connection` as it was, so it can go into
/// a `select!` beside a stop signal and the connection then be drained on its own.
pub async fn drive<F: Future>(connection: F) -> F::Output {
    let mut connection = pin!(connection);
    let turn = Arc::new(Turn::default());
    let turn_waker = Waker::from(Arc::clone(&turn));
    let mut state = State::Poll;
    std::future::poll_fn(move |cx| {
        loop {
            match state {
                State::Poll => {
                    let polled = connection.as_mut().poll(cx);
                    if polled.is_pending() {
                        state = State::Woken;
                    }
                    return polled;
                }
                State::Woken => {
                    turn.ask(cx.waker());
                    // Tokio's `yield_now` hands the waker it is polled with to the thread, which
                    // wakes it once it has nothing else to run; polled once, it asks for that.
                    let _ = pin!(tokio::task::yield_now())
                        .as_mut()
                        .poll(&mut Context::from_waker(&turn_waker));
                    state = State::Waiting;
                }
                // Device tasks that hand the connection more meanwhile wake this task too: it
                // keeps waiting for its turn, which is the point.
                State::Waiting if turn.came() => state = State::Poll,
                State::Waiting => return Poll::Pending,
            }
        }
    })
    .await
}

#[derive(Clone, Copy)]
enum State {
    /// Poll the connection now.
    Poll,
    /// The connection was polled and is pending; the next poll means something woke it.
    Woken,
    /// Asked the thread for a turn; poll the connection when it comes.
    Waiting,
}

/// The waker handed to the thread's deferred list: marks that the turn came and wakes the task.
#[derive(Default)]
struct Turn {
    came: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Turn {
    fn ask(&self, task: &Waker) {
        self.came.store(false, Ordering::Release);
        let mut slot = self.task.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_ref() {
            Some(known) if known.will_wake(task) => {}
            _ => *slot = Some(task.clone()),
        }
    }

    fn came(&self) -> bool {
        self.came.swap(false, Ordering::AcqRel)
    }
}

impl Wake for Turn {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.came.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(task) = task {
            task.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A stand-in for a connection: each poll "writes" everything handed over since the last
    /// one, and it ends once all the items of [`writes_for`] went out.
    struct Queue {
        handed_over: AtomicUsize,
        waker: Mutex<Option<Waker>>,
    }

    impl Queue {
        fn hand_over(&self) {
            self.handed_over.fetch_add(1, Ordering::SeqCst);
            if let Some(waker) = self.waker.lock().unwrap().as_ref() {
                waker.wake_by_ref();
            }
        }
    }

    /// Returns how many writes it took to send `items` handed over by as many tasks that are
    /// all ready at once, the connection driven plainly or by [`drive`].
    async fn writes_for(items: usize, batched: bool) -> usize {
        let queue = Arc::new(Queue {
            handed_over: AtomicUsize::new(0),
            waker: Mutex::new(None),
        });
        let connection = {
            let queue = Arc::clone(&queue);
            let mut sent = 0;
            let mut writes = 0;
            std::future::poll_fn(move |cx| {
                *queue.waker.lock().unwrap() = Some(cx.waker().clone());
                let handed_over = queue.handed_over.load(Ordering::SeqCst);
                if handed_over > sent {
                    sent = handed_over;
                    writes += 1;
                }
                if sent == items {
                    Poll::Ready(writes)
                } else {
                    Poll::Pending
                }
            })
        };
        // Spawned from a worker, so that the connection and the device tasks queue on that one
        // worker, as they do when device connections are served.
        tokio::spawn(async move {
            let connection = if batched {
                tokio::spawn(drive(connection))
            } else {
                tokio::spawn(connection)
            };
            tokio::task::yield_now().await;
            for _ in 0..items {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move { queue.hand_over() });
            }
            connection.await.unwrap()
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn what_many_tasks_hand_over_at_once_leaves_in_a_few_writes() {
        let plain = writes_for(32, false).await;
        let batched = writes_for(32, true).await;
        assert!(
            batched <= 2,
            "driven by `drive`, 32 items handed over at once took {batched} writes (plainly {plain})"
        );
        // The baseline shows what the test would catch: without `drive`, Tokio runs the woken
        // connection after nearly every hand-over.
        assert!(plain > 8, "plainly, 32 items took only {plain} writes");
    }

    #[tokio::test]
    async fn returns_what_the_connection_returns() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let driven = tokio::spawn(drive(rx));
        tx.send(7).unwrap();
        assert_eq!(driven.await.unwrap(), Ok(7));
    }
}
