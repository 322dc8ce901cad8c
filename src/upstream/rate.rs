//! `upstream.rate`: the requests per second qbproxy sends to QuickBlox,
//! session creations included, with a burst above it. QuickBlox's limit is
//! per application, so with `[cluster]` the rate is the fleet's: one GCRA
//! in Redis, one round trip per request. Without Redis (no `[cluster]`, or
//! Redis away) each replica keeps the same GCRA locally, at its share of
//! the rate: `rate` divided by the replicas seen alive in the last minute.
//!
//! A request over the rate waits for its turn up to `upstream.rate_wait`
//! (and its own deadline), then gets 429 `upstream-rate-limited`. Turns are
//! reserved in order, so waiting requests go out as the rate allows.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::config::Rate;

pub struct UpstreamRate {
    rate: Rate,
    cluster: Option<Cluster>,
    local: Mutex<Gcra>,
}

/// No turn within the wait allowed.
#[derive(Debug, Clone, Copy)]
pub struct Exceeded;

impl UpstreamRate {
    pub fn new(rate: Rate, cluster: Option<Cluster>) -> UpstreamRate {
        UpstreamRate {
            rate,
            cluster,
            local: Mutex::new(Gcra::default()),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Waits for this request's turn, until `deadline` at the latest (and
    /// never longer than `rate_wait`).
    pub async fn acquire(&self, deadline: Instant) -> Result<(), Exceeded> {
        let now = Instant::now();
        let max_wait = (now + self.rate.wait)
            .min(deadline)
            .saturating_duration_since(now);
        let interval = Duration::from_secs_f64(1.0 / self.rate.per_second);
        let delay = match &self.cluster {
            Some(cluster) => match cluster.rate(interval, self.rate.burst, max_wait).await {
                Ok(delay) => delay,
                // Redis away: this replica's share, locally.
                Err(_) => self.local_turn(now, cluster.alive(), max_wait),
            },
            None => self.local_turn(now, 1, max_wait),
        };
        match delay {
            Some(d) if d.is_zero() => Ok(()),
            Some(d) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            None => Err(Exceeded),
        }
    }

    /// A turn from the local GCRA at `1/share` of the rate.
    fn local_turn(&self, now: Instant, share: usize, max_wait: Duration) -> Option<Duration> {
        let share = share.max(1) as f64;
        let interval = Duration::from_secs_f64(share / self.rate.per_second);
        let burst = (self.rate.burst / share).max(1.0);
        self.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .turn(now, interval, burst, max_wait)
    }
}

/// The generic cell rate algorithm: one number, the theoretical arrival
/// time of the next request.
#[derive(Default)]
struct Gcra {
    tat: Option<Instant>,
}

impl Gcra {
    /// Reserves the next turn: how long until it, or `None` (nothing
    /// reserved) if that is longer than `max_wait`.
    fn turn(
        &mut self,
        now: Instant,
        interval: Duration,
        burst: f64,
        max_wait: Duration,
    ) -> Option<Duration> {
        let tat = self.tat.unwrap_or(now).max(now);
        let tolerance = interval.mul_f64(burst);
        let allowed_at = (tat + interval).checked_sub(tolerance).unwrap_or(now);
        let delay = allowed_at.saturating_duration_since(now);
        if delay > max_wait {
            return None;
        }
        self.tat = Some(tat + interval);
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_lets_a_burst_through_then_paces_at_the_rate() {
        let mut g = Gcra::default();
        let start = Instant::now();
        let interval = Duration::from_millis(100); // 10 per second
                                                   // A burst of 3 at once.
        for _ in 0..3 {
            assert_eq!(
                g.turn(start, interval, 3.0, Duration::ZERO),
                Some(Duration::ZERO)
            );
        }
        // The fourth must wait a full interval, or is refused without wait.
        assert_eq!(g.turn(start, interval, 3.0, Duration::ZERO), None);
        assert_eq!(
            g.turn(start, interval, 3.0, Duration::from_secs(1)),
            Some(interval)
        );
        // Turns are reserved in order: the next one is one more interval on.
        assert_eq!(
            g.turn(start, interval, 3.0, Duration::from_secs(1)),
            Some(interval * 2)
        );
        // After a long pause the burst is back, no more.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(
                g.turn(later, interval, 3.0, Duration::ZERO),
                Some(Duration::ZERO)
            );
        }
        assert_eq!(g.turn(later, interval, 3.0, Duration::ZERO), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_over_the_rate_waits_up_to_rate_wait_then_is_refused() {
        let rate = UpstreamRate::new(
            Rate {
                per_second: 2.0,
                burst: 1.0,
                wait: Duration::from_millis(600),
            },
            None,
        );
        let far = Instant::now() + Duration::from_secs(60);
        let start = Instant::now();
        // Three at once: the first goes, the second waits its turn (500 ms),
        // the third's turn (1 s) is past rate_wait.
        let (a, b, c) = tokio::join!(rate.acquire(far), rate.acquire(far), rate.acquire(far));
        assert!(a.is_ok() && b.is_ok() && c.is_err());
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(500),
            "the second waited"
        );
        // A request's own deadline bounds the wait too.
        assert!(rate.acquire(Instant::now()).await.is_err());
    }
}
