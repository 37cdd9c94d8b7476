//! Progress of a long run on stderr, for `coinflow-sender generate`/`replay` and
//! `coinflow-bench`.
//!
//! On a terminal (stderr is a TTY) an `indicatif` bar shows the count, the rate, the
//! errors and the ETA, updated every [`REDRAW`] and cleared when the run ends. Anywhere else (CI logs, a pipe, a
//! file) it prints one plain line every [`PLAIN_EVERY`] instead, and nothing at all for a
//! run shorter than that, so logs stay readable. The counts are polled from the caller
//! (usually [`Sender::counts`](crate::deliver::Sender::counts)), so the work itself never
//! waits on the display.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the terminal bar is updated.
pub const REDRAW: Duration = Duration::from_millis(200);

/// How often a plain line is printed when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);

const BAR: &str = "{prefix} [{bar:30}] {pos}/{len}, {msg}, ETA {eta}";

/// What a run has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Units finished (a delivery acked or given up).
    pub done: u64,
    /// Failures so far (for the sender: attempts not answered 200).
    pub errors: u64,
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// An `indicatif` bar on stderr.
    Bar,
    /// A plain line on stderr this often.
    Lines(Duration),
    /// Nothing.
    Off,
}

impl Display {
    /// A bar when stderr is a terminal, otherwise a plain line every [`PLAIN_EVERY`].
    pub fn for_stderr() -> Self {
        if std::io::stderr().is_terminal() {
            Self::Bar
        } else {
            Self::Lines(PLAIN_EVERY)
        }
    }
}

/// A running display; [`Progress::finish`] stops it.
pub struct Progress {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Progress {
    /// Shows the progress of `what` towards `total` units as [`Display::for_stderr`] says,
    /// polling `counts`. Needs a tokio runtime.
    pub fn start(
        what: impl Into<String>,
        total: u64,
        counts: impl Fn() -> Counts + Send + 'static,
    ) -> Self {
        Self::start_with(Display::for_stderr(), what, total, counts)
    }

    /// As [`Progress::start`], shown as `display` says.
    pub fn start_with(
        display: Display,
        what: impl Into<String>,
        total: u64,
        counts: impl Fn() -> Counts + Send + 'static,
    ) -> Self {
        let what = what.into();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            match display {
                Display::Bar => bar(what, total, counts, stopped).await,
                Display::Lines(every) => lines(what, total, counts, every, stopped).await,
                Display::Off => {}
            }
        });
        Self { stop, task }
    }

    /// Stops the display and clears the bar (the caller's report follows).
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn bar(what: String, total: u64, counts: impl Fn() -> Counts, stop: CancellationToken) {
    let style = ProgressStyle::with_template(BAR)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
        .with_style(style)
        .with_prefix(what);
    let started = Instant::now();
    let show = |c: Counts| {
        bar.set_message(format!(
            "{:.1}/s, {} errors",
            rate(c.done, started.elapsed()),
            c.errors
        ));
        bar.set_position(c.done);
    };
    let mut tick = tokio::time::interval(REDRAW);
    loop {
        show(counts());
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
    }
    bar.finish_and_clear();
}

async fn lines(
    what: String,
    total: u64,
    counts: impl Fn() -> Counts,
    every: Duration,
    stop: CancellationToken,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval_at(started + every, every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                eprintln!("{}", plain_line(&what, counts(), total, started.elapsed()));
            }
            () = stop.cancelled() => break,
        }
    }
}

/// Units per second on average since the start.
fn rate(done: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 { done as f64 / secs } else { 0.0 }
}

/// The line printed when stderr is not a terminal, e.g.
/// `delivering: 250/1000 (25%), 50.0/s, 3 errors, ETA 15s`.
pub fn plain_line(what: &str, counts: Counts, total: u64, elapsed: Duration) -> String {
    let rate = rate(counts.done, elapsed);
    let percent = counts
        .done
        .min(total)
        .saturating_mul(100)
        .checked_div(total)
        .unwrap_or(100);
    let left = total.saturating_sub(counts.done);
    let eta = if left == 0 {
        "0s".to_owned()
    } else if rate > 0.0 {
        let secs = (left as f64 / rate).round().min(u64::MAX as f64) as u64;
        humantime::format_duration(Duration::from_secs(secs)).to_string()
    } else {
        "unknown".to_owned()
    };
    format!(
        "{what}: {}/{total} ({percent}%), {rate:.1}/s, {} errors, ETA {eta}",
        counts.done, counts.errors
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_line_has_the_count_rate_errors_and_eta() {
        let line = plain_line(
            "delivering",
            Counts {
                done: 250,
                errors: 3,
            },
            1000,
            Duration::from_secs(5),
        );
        // 250 in 5 s is 50/s; the 750 left take 15 s more.
        assert_eq!(
            line,
            "delivering: 250/1000 (25%), 50.0/s, 3 errors, ETA 15s"
        );

        let line = plain_line(
            "SQLite pipeline",
            Counts {
                done: 1200,
                errors: 0,
            },
            20_000,
            Duration::from_millis(1500),
        );
        // 800/s; 18,800 left: 23.5 s, rounded to 24 s.
        assert_eq!(
            line,
            "SQLite pipeline: 1200/20000 (6%), 800.0/s, 0 errors, ETA 24s"
        );

        let line = plain_line(
            "replay",
            Counts {
                done: 30,
                errors: 1,
            },
            3000,
            Duration::from_secs(60),
        );
        // 0.5/s: 2,970 left take 5,940 s.
        assert_eq!(line, "replay: 30/3000 (1%), 0.5/s, 1 errors, ETA 1h 39m");
    }

    #[test]
    fn a_plain_line_before_anything_is_done_or_after_everything_is() {
        assert_eq!(
            plain_line("x", Counts::default(), 10, Duration::ZERO),
            "x: 0/10 (0%), 0.0/s, 0 errors, ETA unknown"
        );
        assert_eq!(
            plain_line(
                "x",
                Counts {
                    done: 12,
                    errors: 2
                },
                10,
                Duration::from_secs(4)
            ),
            "x: 12/10 (100%), 3.0/s, 2 errors, ETA 0s"
        );
        assert_eq!(
            plain_line("x", Counts::default(), 0, Duration::from_secs(1)),
            "x: 0/0 (100%), 0.0/s, 0 errors, ETA 0s"
        );
    }
}
