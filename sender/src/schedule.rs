//! Coinflow's retry schedule: 16 attempts; the wait before each retry roughly doubles, from
//! 1 s to about 9 h (×2.1 per step), about 17 hours in all. A compression factor divides
//! every wait, so tests can run the whole schedule in seconds.

use std::time::Duration;

/// Attempts per delivery, the first included.
pub const ATTEMPTS: usize = 16;

/// The wait before retry `n` (1-based: the wait after the first attempt is `wait(1)`).
pub fn wait(n: usize, compress: f64) -> Duration {
    let secs = 2.1_f64.powi(i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX));
    Duration::from_secs_f64(secs / compress.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_one_second_to_about_nine_hours() {
        assert_eq!(wait(1, 1.0), Duration::from_secs(1));
        let last = wait(ATTEMPTS - 1, 1.0).as_secs_f64() / 3600.0;
        assert!((8.5..9.5).contains(&last), "{last} h");
        let total: f64 = (1..ATTEMPTS)
            .map(|n| wait(n, 1.0).as_secs_f64())
            .sum::<f64>()
            / 3600.0;
        assert!((16.0..19.0).contains(&total), "{total} h");
        assert!(wait(ATTEMPTS - 1, 10_000.0) < Duration::from_secs(4));
    }
}
