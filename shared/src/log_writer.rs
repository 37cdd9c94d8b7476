//! Where log lines go: appended to one buffer in memory, which a thread of its own writes
//! out every [`FLUSH_EVERY`], or sooner once [`WAKE_AT`] bytes wait. A line costs its caller
//! a copy under a short lock and nothing else: no system call, and no thread woken per
//! line. (A channel to a writer thread, `tracing-appender`'s design, wakes that thread for
//! nearly every line under load: a futex call and a context switch per delivery, measured
//! as most of what `info` cost over `warn`; BENCHMARKS.md.)
//!
//! Never lossy: past [`MAX_PENDING`] bytes (output stalled), callers wait for the writer.
//! Dropping the [`LogGuard`] writes out what is left. A killed process loses at most the
//! last [`FLUSH_EVERY`] of lines, as with any buffered log.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long a line may wait in memory.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Waiting bytes that wake the writer before its time.
pub const WAKE_AT: usize = 64 * 1024;
/// Waiting bytes beyond which callers wait for the writer.
pub const MAX_PENDING: usize = 4 * 1024 * 1024;

/// A handle for the log layer (`with_writer`); cheap to clone.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// Writes out what is left, and stops the writer thread, when dropped.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when the writer should not wait for its time: much is waiting, or closing.
    wake: Condvar,
    /// Signalled after every swap: room for callers waiting at [`Shared::max_pending`].
    drained: Condvar,
    wake_at: usize,
    max_pending: usize,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    closed: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only bytes behind: still writable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Starts the writer thread over `out` (stderr in the services).
pub fn start<W: Write + Send + 'static>(out: W) -> io::Result<(LogWriter, LogGuard)> {
    start_with(out, WAKE_AT, MAX_PENDING)
}

fn start_with<W: Write + Send + 'static>(
    out: W,
    wake_at: usize,
    max_pending: usize,
) -> io::Result<(LogWriter, LogGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        drained: Condvar::new(),
        wake_at,
        max_pending,
    });
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn({
            let shared = Arc::clone(&shared);
            move || write_out(&shared, out)
        })?;
    Ok((
        LogWriter {
            shared: Arc::clone(&shared),
        },
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

/// The writer thread: swaps the buffer out and writes it, until closed and empty.
fn write_out<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
    loop {
        let closed = {
            let mut state = shared.lock();
            if state.pending.is_empty() && !state.closed {
                state = shared
                    .wake
                    .wait_timeout(state, FLUSH_EVERY)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut state.pending, &mut batch);
            state.closed
        };
        shared.drained.notify_all();
        if !batch.is_empty() {
            // Nowhere to report a failed write of the log itself: the lines are dropped.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
        } else if closed {
            return;
        }
    }
}

impl LogWriter {
    fn append(&self, line: &[u8]) {
        let shared = &self.shared;
        let mut state = shared.lock();
        while state.pending.len() >= shared.max_pending && !state.closed {
            state = shared
                .drained
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        let before = state.pending.len();
        state.pending.extend_from_slice(line);
        let crossed = before < shared.wake_at && state.pending.len() >= shared.wake_at;
        drop(state);
        if crossed {
            shared.wake.notify_one();
        }
    }
}

impl Write for &LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = &'a LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    /// A sink the test can read while the writer holds it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_of_every_thread_is_written_whole_and_in_its_threads_order() {
        let sink = Sink::default();
        let (writer, guard) = start(sink.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        (&w).write_all(
                            format!("thread {t} line {i} {}\n", "x".repeat(i % 97)).as_bytes(),
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let parts: Vec<_> = line.split(' ').collect();
            let (t, i): (usize, usize) = (parts[1].parse().unwrap(), parts[3].parse().unwrap());
            assert_eq!(i, next[t], "thread {t}'s lines out of order or missing");
            assert_eq!(parts[4].len(), i % 97, "a line was cut");
            next[t] += 1;
        }
        assert_eq!(next, [5_000; 4]);
    }

    #[test]
    fn a_line_is_written_within_its_time_without_a_flush_or_a_drop() {
        let sink = Sink::default();
        let (writer, _guard) = start(sink.clone()).unwrap();
        (&writer).write_all(b"one line\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.0.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the line was never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"one line\n");
    }

    /// A sink that takes one write per permission, to stall the writer.
    struct Gate(mpsc::Receiver<()>, Sink);

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            self.1.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_output_makes_callers_wait_and_loses_nothing() {
        let (open, gate) = mpsc::channel();
        let sink = Sink::default();
        let (writer, guard) = start_with(Gate(gate, sink.clone()), 16, 64).unwrap();
        let (wrote, lines) = mpsc::channel();
        let caller = std::thread::spawn({
            let writer = writer.clone();
            move || {
                for i in 0..100 {
                    (&writer)
                        .write_all(format!("line {i:04}\n").as_bytes())
                        .unwrap();
                    wrote.send(i).unwrap();
                }
            }
        });
        // With the output stalled, the caller gets no further than the limit allows: the
        // writer holds one swapped-out batch, the buffer up to 64 bytes more (10-byte lines).
        std::thread::sleep(Duration::from_millis(200));
        let written_so_far = lines.try_iter().count();
        assert!(written_so_far < 100, "nothing held the caller back");
        assert!(
            written_so_far <= 20,
            "{written_so_far} lines went past the limit"
        );
        for _ in 0..1_000 {
            let _ = open.send(());
        }
        caller.join().unwrap();
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let expected: String = (0..100).map(|i| format!("line {i:04}\n")).collect();
        assert_eq!(text, expected);
    }
}
