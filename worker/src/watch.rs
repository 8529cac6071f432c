//! What the coordinator needs to tell a stuck rank from a waiting one: whether the training
//! thread is inside a ring collective (and since when), its recent step time, and the
//! coordinator's word that the ring is to be abandoned.
//!
//! A rank whose process lives but whose training thread is stuck (a storage read that never
//! returns, a deadlocked kernel) keeps its heartbeats and HTTP/2 keepalives going from other
//! tasks, so nothing at the transport level ever notices. Its neighbours do notice: they wait
//! in the all-reduce. The heartbeat carries both facts, and the coordinator decides.

use std::sync::{Arc, Mutex};

use crate::metrics::WorkerMetrics;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::Notify;

/// Shared between the training thread (which enters and leaves collectives and times steps),
/// the heartbeat task (which reads it) and the session (which aborts rings).
#[derive(Debug)]
pub struct RingWatch {
    origin: Instant,
    /// Milliseconds after `origin` at which the current collective started, plus one; 0 when
    /// the training thread is in none.
    waiting_since: AtomicU64,
    /// Whether a state exchange is in progress (the first weights, a joining worker's
    /// state): the coordinator neither blames a rank in one nor takes its time in the
    /// exchange's collectives as waiting for the others. Counted as waiting, a receiver
    /// still loading the state had the sender, already computing its first step, removed.
    exchanging: AtomicBool,
    /// Smoothed seconds per step in the current epoch, as f64 bits; 0 before its first step.
    step_seconds: AtomicU64,
    /// The ring generation of the unit being worked on (0: none yet).
    generation: AtomicU64,
    /// The ring generation the coordinator aborted (0: none) and why.
    aborted: AtomicU64,
    reason: Mutex<String>,
    notify: Notify,
}

impl Default for RingWatch {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            waiting_since: AtomicU64::new(0),
            exchanging: AtomicBool::new(false),
            step_seconds: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
            reason: Mutex::new(String::new()),
            notify: Notify::new(),
        }
    }
}

impl RingWatch {
    /// A unit of ring `generation` starts: what the heartbeat says of waiting is about it.
    pub fn start_unit(&self, generation: u64) {
        self.leave();
        self.end_exchange();
        self.generation.store(generation, Ordering::Relaxed);
    }

    /// The ring generation of the unit being worked on (0: none yet).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Milliseconds since `origin`, plus one: never 0, which means "not waiting".
    fn stamp(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }

    /// The training thread enters a collective.
    pub fn enter(&self) {
        self.waiting_since.store(self.stamp(), Ordering::Relaxed);
    }

    /// The training thread left the collective.
    pub fn leave(&self) {
        self.waiting_since.store(0, Ordering::Relaxed);
    }

    /// A state exchange starts (see `exchanging`).
    pub fn begin_exchange(&self) {
        self.exchanging.store(true, Ordering::Relaxed);
    }

    /// The state exchange is over.
    pub fn end_exchange(&self) {
        self.exchanging.store(false, Ordering::Relaxed);
    }

    /// Whether a state exchange is in progress.
    pub fn exchanging(&self) -> bool {
        self.exchanging.load(Ordering::Relaxed)
    }

    /// How long the training thread has been in the current collective; 0 outside one, and
    /// through a state exchange (see `exchanging`).
    pub fn waiting_seconds(&self) -> f64 {
        match self.waiting_since.load(Ordering::Relaxed) {
            _ if self.exchanging() => 0.0,
            0 => 0.0,
            since => self.stamp().saturating_sub(since).max(1) as f64 / 1000.0,
        }
    }

    /// A new epoch starts: its steps may take another time than the last one's (the head
    /// phase's cached steps against fine-tuning's full ones).
    pub fn new_epoch(&self) {
        self.step_seconds.store(0, Ordering::Relaxed);
    }

    /// A step took `seconds`.
    pub fn record_step(&self, seconds: f64) {
        let before = self.step_seconds();
        let smoothed = if before > 0.0 {
            0.7 * before + 0.3 * seconds
        } else {
            seconds
        };
        self.step_seconds.store(smoothed.to_bits(), Ordering::Relaxed);
    }

    /// Recent seconds per step in this epoch; 0 before its first step.
    pub fn step_seconds(&self) -> f64 {
        f64::from_bits(self.step_seconds.load(Ordering::Relaxed))
    }

    /// The coordinator abandoned ring `generation`: its collectives end at once.
    pub fn abort(&self, generation: u64, reason: &str) {
        if let Ok(mut r) = self.reason.lock() {
            reason.clone_into(&mut r);
        }
        self.aborted.store(generation, Ordering::Relaxed);
        self.notify.notify_waiters();
    }

    /// Completes (with the coordinator's reason) once ring `generation` is aborted.
    pub async fn aborted(&self, generation: u64) -> String {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.aborted.load(Ordering::Relaxed) == generation {
                return self.reason.lock().map(|r| r.clone()).unwrap_or_default();
            }
            notified.await;
        }
    }
}

/// What a training thread tells the rest of the worker as it goes: the last step and the
/// weight checksums taken since the last heartbeat (for heartbeats), and its metrics (for
/// scrapes).
#[derive(Debug, Default)]
pub struct Beat {
    /// Global steps taken.
    pub step: AtomicU64,
    /// (step, checksum of the trainable weights, ring generation) not yet sent.
    pub checksums: std::sync::Mutex<Vec<(u64, u64, u64)>>,
    /// Step, data, all-reduce and checkpoint metrics.
    pub metrics: WorkerMetrics,
    /// The ring generation the coordinator asked to stop after its current step (workers
    /// are waiting to join); 0 for none.
    pub regroup: AtomicU64,
    /// Bumped when the coordinator is lost: training started under an earlier value stops
    /// at its next step.
    pub session: AtomicU64,
    /// Collective waits, step times and ring aborts (see [`RingWatch`]).
    pub watch: Arc<RingWatch>,
}

impl Beat {
    /// Take the checksums not yet sent.
    pub fn drain(&self) -> Vec<(u64, u64, u64)> {
        self.checksums
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn waiting_is_timed_only_inside_a_collective() {
        let watch = RingWatch::default();
        assert_eq!(watch.waiting_seconds(), 0.0);
        watch.enter();
        std::thread::sleep(Duration::from_millis(30));
        let waited = watch.waiting_seconds();
        assert!((0.025..1.0).contains(&waited), "{waited}");
        watch.leave();
        assert_eq!(watch.waiting_seconds(), 0.0);
        // A state exchange's collectives are not waiting: the rank says it is exchanging.
        watch.begin_exchange();
        watch.enter();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(watch.waiting_seconds(), 0.0);
        assert!(watch.exchanging());
        watch.leave();
        watch.end_exchange();
        assert!(!watch.exchanging());
    }

    #[test]
    fn step_time_is_smoothed_within_an_epoch_and_forgotten_at_the_next() {
        let watch = RingWatch::default();
        watch.record_step(1.0);
        assert_eq!(watch.step_seconds(), 1.0);
        watch.record_step(2.0);
        assert!((watch.step_seconds() - 1.3).abs() < 1e-12);
        watch.new_epoch();
        assert_eq!(watch.step_seconds(), 0.0);
    }

    #[test]
    fn an_abort_ends_a_wait_on_that_generation_only() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let watch = Arc::new(RingWatch::default());
        runtime.block_on(async {
            let waiter = tokio::spawn({
                let watch = watch.clone();
                async move { watch.aborted(3).await }
            });
            tokio::task::yield_now().await;
            watch.abort(2, "another ring");
            tokio::task::yield_now().await;
            assert!(
                !waiter.is_finished(),
                "generation 2's abort ended generation 3's wait"
            );
            watch.abort(3, "rank 1 is stuck");
            let reason = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(reason, "rank 1 is stuck");
            // Already aborted: answers at once.
            assert_eq!(watch.aborted(3).await, "rank 1 is stuck");
        });
    }
}
