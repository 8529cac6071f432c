//! Which rank holds the ring up: a pure function of the ranks' last heartbeats, the step
//! timeout and the clock.
//!
//! A ring all-reduce waits for its slowest member, so a rank whose training thread is stuck
//! (a storage read that never returns, a deadlocked kernel, a stopped process) stalls every
//! other rank inside the collective, while its own heartbeats and keepalives, sent by other
//! tasks, may go on. Every heartbeat says whether the rank waits in a collective and for how
//! long. When some rank has waited longer than the step timeout, the ranks that are not
//! waiting, or whose heartbeats stopped, are the stuck ones. When every rank waits, no rank is
//! to blame (a link is down): the ring's own peer timeout deals with that. A rank in a state
//! exchange (sending, receiving or loading the training state) is busy: neither evidence
//! nor blamed.

use std::time::{Duration, Instant};

/// The step timeout when none is given is this many times the ring's recent step time...
pub const AUTO_FACTOR: f64 = 10.0;
/// ...but never less than this.
pub const AUTO_FLOOR: Duration = Duration::from_secs(30);
/// Before a step time of the current unit is known (the first steps of a run or a phase
/// download data and weights, build caches and compile kernels), the automatic timeout is
/// this.
pub const AUTO_FIRST: Duration = Duration::from_secs(600);
/// A rank whose last heartbeat is older than this (workers send one a second) counts as not
/// waiting, whatever that heartbeat said: its process may be stopped.
pub const SILENT_AFTER: Duration = Duration::from_secs(4);

/// `--step-timeout`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepTimeout {
    /// A fixed limit.
    Fixed(Duration),
    /// Derived from the ring's recent step times (see [`limit`]).
    Auto,
}

impl StepTimeout {
    /// From the command line's seconds: 0 means automatic.
    pub fn from_seconds(seconds: f64) -> Self {
        if seconds > 0.0 {
            StepTimeout::Fixed(Duration::from_secs_f64(seconds))
        } else {
            StepTimeout::Auto
        }
    }
}

/// What a heartbeat says of the rank's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Reported {
    /// How long its training thread had been waiting in a collective (0: not in one).
    pub waiting_seconds: f64,
    /// Its recent step time in the current epoch (0: none yet).
    pub step_seconds: f64,
    /// The ring generation it is working in; what it says of waiting counts only for the
    /// current one (a heartbeat from before a re-formed ring describes the old ring).
    pub generation: u64,
    /// It was in a state exchange (sending, receiving or loading the training state).
    pub exchanging: bool,
}

/// One ranked worker's last heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct RankBeat {
    /// Its rank in the current ring.
    pub rank: u32,
    /// When its last heartbeat arrived.
    pub seen: Instant,
    /// How long it had been waiting in a collective then (0: it was not in one).
    pub waiting_seconds: f64,
    /// That heartbeat was about the current ring generation.
    pub current: bool,
    /// It was in a state exchange: busy, neither evidence of a held-up ring nor to blame.
    pub exchanging: bool,
}

/// The ranks found stuck.
#[derive(Debug, Clone, PartialEq)]
pub struct Stuck {
    /// Ranks holding the ring up, in order.
    pub ranks: Vec<u32>,
    /// The longest wait of the others, seconds.
    pub waited_seconds: f64,
    /// The limit it exceeded.
    pub limit: Duration,
}

/// The step timeout in force: the fixed one, or `AUTO_FACTOR` times the ring's recent step
/// time (`recent_step_seconds`) with `AUTO_FLOOR` as the floor, or `AUTO_FIRST` before any
/// step time is known.
pub fn limit(timeout: StepTimeout, recent_step_seconds: Option<f64>) -> Duration {
    match (timeout, recent_step_seconds) {
        (StepTimeout::Fixed(limit), _) => limit,
        (StepTimeout::Auto, Some(s)) if s.is_finite() && s > 0.0 => {
            Duration::from_secs_f64(s * AUTO_FACTOR).max(AUTO_FLOOR)
        }
        (StepTimeout::Auto, _) => AUTO_FIRST,
    }
}

/// The ranks that hold the ring up at `now`, if the ring is held up past `limit`.
pub fn stuck_ranks(beats: &[RankBeat], limit: Duration, now: Instant) -> Option<Stuck> {
    let silent = |b: &RankBeat| now.saturating_duration_since(b.seen) > SILENT_AFTER;
    let waited = |b: &RankBeat| b.waiting_seconds + now.saturating_duration_since(b.seen).as_secs_f64();
    let waited_seconds = beats
        .iter()
        .filter(|b| b.current && !b.exchanging && b.waiting_seconds > 0.0 && !silent(b))
        .map(waited)
        .fold(0.0, f64::max);
    if waited_seconds <= limit.as_secs_f64() {
        return None;
    }
    let mut ranks: Vec<u32> = beats
        .iter()
        .filter(|b| silent(b) || (b.current && !b.exchanging && b.waiting_seconds == 0.0))
        .map(|b| b.rank)
        .collect();
    ranks.sort_unstable();
    (!ranks.is_empty() && ranks.len() < beats.len()).then_some(Stuck {
        ranks,
        waited_seconds,
        limit,
    })
}

/// The median of the ranks' recent step times (those that have one).
pub fn median_step_seconds(step_seconds: impl IntoIterator<Item = f64>) -> Option<f64> {
    let mut known: Vec<f64> = step_seconds
        .into_iter()
        .filter(|s| s.is_finite() && *s > 0.0)
        .collect();
    if known.is_empty() {
        return None;
    }
    known.sort_by(f64::total_cmp);
    Some(known[known.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(rank: u32, now: Instant, ago_ms: u64, waiting_seconds: f64) -> RankBeat {
        RankBeat {
            rank,
            seen: now - Duration::from_millis(ago_ms),
            waiting_seconds,
            current: true,
            exchanging: false,
        }
    }

    #[test]
    fn heartbeats_about_an_earlier_ring_are_no_evidence_either_way() {
        let now = Instant::now() + Duration::from_secs(100);
        let limit = Duration::from_secs(3);
        // Rank 0's last word is its long wait in the ring that was just replaced; ranks 1 and
        // 2 are starting the new one.
        let old = RankBeat {
            current: false,
            ..beat(0, now, 500, 3.9)
        };
        let starting = [old.clone(), beat(1, now, 100, 0.0), beat(2, now, 100, 0.0)];
        assert_eq!(stuck_ranks(&starting, limit, now), None);
        // Nor is a rank still reporting the old ring blamed for the new one's wait.
        let waiting = [old, beat(1, now, 100, 5.0), beat(2, now, 100, 5.0)];
        assert_eq!(stuck_ranks(&waiting, limit, now), None);
    }

    #[test]
    fn a_state_exchange_is_neither_waiting_nor_holding_up() {
        let now = Instant::now() + Duration::from_secs(100);
        let limit = Duration::from_secs(3);
        let exchanging = |rank| RankBeat {
            exchanging: true,
            ..beat(rank, now, 900, 0.0)
        };
        // Rank 0 has sent the state and computes its first step; ranks 1 and 2 still load
        // it, 7 s into the exchange. Nobody waits for rank 0 yet.
        let loading = [beat(0, now, 100, 0.0), exchanging(1), exchanging(2)];
        assert_eq!(stuck_ranks(&loading, limit, now), None);
        // Rank 1 is through and waits in the first all-reduce: rank 2, still loading, is
        // busy, and rank 0 is within the limit.
        let first = [beat(0, now, 100, 0.0), beat(1, now, 100, 1.0), exchanging(2)];
        assert_eq!(stuck_ranks(&first, limit, now), None);
        // Past the limit, the rank that computes is the one holding the ring up; the one
        // still loading is not blamed.
        let late = [beat(0, now, 100, 0.0), beat(1, now, 100, 4.0), exchanging(2)];
        assert_eq!(stuck_ranks(&late, limit, now).map(|s| s.ranks), Some(vec![0]));
    }

    #[test]
    fn the_rank_not_waiting_while_others_wait_past_the_limit_is_stuck() {
        let now = Instant::now() + Duration::from_secs(100);
        let limit = Duration::from_secs_f64(4.9);
        // Ranks 0 and 2 have waited 4.5 s (+0.5 s since their heartbeats); rank 1 computes.
        let beats = [
            beat(0, now, 500, 4.5),
            beat(1, now, 200, 0.0),
            beat(2, now, 500, 4.5),
        ];
        let stuck = stuck_ranks(&beats, limit, now).unwrap();
        assert_eq!(stuck.ranks, vec![1]);
        assert!((stuck.waited_seconds - 5.0).abs() < 1e-9, "{stuck:?}");
        // Within the limit: nothing yet.
        assert_eq!(stuck_ranks(&beats, Duration::from_secs_f64(5.01), now), None);
    }

    #[test]
    fn a_rank_whose_heartbeats_stopped_is_stuck_whatever_it_last_said() {
        let now = Instant::now() + Duration::from_secs(100);
        // Rank 2 was stopped while it waited in the collective, 6 s ago.
        let beats = [
            beat(0, now, 300, 6.0),
            beat(1, now, 300, 6.0),
            beat(2, now, 6_000, 0.1),
        ];
        let stuck = stuck_ranks(&beats, Duration::from_secs(5), now).unwrap();
        assert_eq!(stuck.ranks, vec![2]);
    }

    #[test]
    fn no_rank_is_blamed_when_all_wait_or_none_does() {
        let now = Instant::now() + Duration::from_secs(100);
        let limit = Duration::from_secs(5);
        // All in the collective (a link is down: the ring's peer timeout handles it).
        let all = [beat(0, now, 100, 60.0), beat(1, now, 100, 60.0)];
        assert_eq!(stuck_ranks(&all, limit, now), None);
        // Nobody waits (evaluation at the end of an epoch, however long).
        let none = [beat(0, now, 100, 0.0), beat(1, now, 100, 0.0)];
        assert_eq!(stuck_ranks(&none, limit, now), None);
        // A silent rank's stale "waiting" is not evidence that the ring is held up.
        let stale = [beat(0, now, 9_000, 60.0), beat(1, now, 100, 0.0)];
        assert_eq!(stuck_ranks(&stale, limit, now), None);
    }

    #[test]
    fn the_automatic_limit_follows_recent_steps_with_a_floor() {
        assert_eq!(
            limit(StepTimeout::Fixed(Duration::from_secs(3)), Some(100.0)),
            Duration::from_secs(3)
        );
        assert_eq!(limit(StepTimeout::Auto, Some(0.2)), AUTO_FLOOR);
        assert_eq!(limit(StepTimeout::Auto, Some(12.0)), Duration::from_secs(120));
        assert_eq!(limit(StepTimeout::Auto, None), AUTO_FIRST);
        assert_eq!(limit(StepTimeout::Auto, Some(f64::NAN)), AUTO_FIRST);
        assert_eq!(StepTimeout::from_seconds(0.0), StepTimeout::Auto);
        assert_eq!(median_step_seconds([0.0, 3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median_step_seconds([0.0]), None);
    }
}
