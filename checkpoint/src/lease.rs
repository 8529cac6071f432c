//! One coordinator per checkpoint root: a lease in the root's `LEASE` object, taken and
//! renewed by compare-and-swap ([`storage::Location::put_if`]).
//!
//! Two coordinators on one root (a Deployment during a partition, a second `coordinator
//! start` by mistake) would both move `LATEST`, and each one's retention would delete the
//! other's uploads. The lease makes the second refuse to start while the first's is live, and
//! makes a holder whose lease was taken over fail its next renewal (and so its next commit).
//! Every taking bumps the incarnation, which the coordinator puts into its ring generations:
//! they stay unique across coordinators from the first moment, before any checkpoint.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use storage::{Location, Version};

use crate::error::{Error, Result};

const LEASE: &str = "LEASE";

/// What `LEASE` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Who holds it (host, process), for messages.
    pub holder: String,
    /// Bumped by every coordinator that takes the lease.
    pub incarnation: u64,
    /// When it lapses unless renewed (Unix milliseconds); 0 once released.
    pub expires_unix_ms: u64,
}

/// Whether a lease can be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Free (never taken, lapsed or released): take it as this incarnation.
    Take {
        /// The incarnation the taker becomes.
        incarnation: u64,
    },
    /// Someone holds it.
    Held {
        /// Who.
        holder: String,
        /// Until when, Unix milliseconds.
        expires_unix_ms: u64,
    },
}

/// Whether the lease whose record is `current` can be taken at `now_unix_ms`.
pub fn claim(current: Option<&LeaseRecord>, now_unix_ms: u64) -> Claim {
    match current {
        None => Claim::Take { incarnation: 1 },
        Some(r) if r.expires_unix_ms <= now_unix_ms => Claim::Take {
            incarnation: r.incarnation + 1,
        },
        Some(r) => Claim::Held {
            holder: r.holder.clone(),
            expires_unix_ms: r.expires_unix_ms,
        },
    }
}

/// A lease this process holds on a checkpoint root.
#[derive(Debug)]
pub struct Lease {
    root: Location,
    record: LeaseRecord,
    version: Version,
    ttl: Duration,
}

impl Lease {
    /// Take the lease on `root` for `holder`, for `ttl` from `now_unix_ms`; refused with
    /// [`Error::LeaseHeld`] while another holder's is live.
    pub(crate) async fn take(root: &Location, holder: &str, ttl: Duration, now_unix_ms: u64) -> Result<Self> {
        let current = read(root).await?;
        let (record, expected) = match &current {
            Some((record, version)) => (Some(record), Some(version)),
            None => (None, None),
        };
        let incarnation = match claim(record, now_unix_ms) {
            Claim::Take { incarnation } => incarnation,
            Claim::Held {
                holder: other,
                expires_unix_ms,
            } => return Err(held(root, other, expires_unix_ms, now_unix_ms)),
        };
        let record = LeaseRecord {
            holder: holder.to_string(),
            incarnation,
            expires_unix_ms: now_unix_ms + ttl.as_millis() as u64,
        };
        match write(root, &record, expected).await {
            Ok(version) => Ok(Self {
                root: root.clone(),
                record,
                version,
                ttl,
            }),
            // Another coordinator took it between our read and our write.
            Err(Error::Storage(e)) if e.is_conflict() => match read(root).await? {
                Some((other, _)) => Err(held(root, other.holder, other.expires_unix_ms, now_unix_ms)),
                None => Err(Error::Storage(e)),
            },
            Err(e) => Err(e),
        }
    }

    /// The incarnation this lease was taken as.
    pub fn incarnation(&self) -> u64 {
        self.record.incarnation
    }

    /// Who holds it (this process).
    pub fn holder(&self) -> &str {
        &self.record.holder
    }

    /// How long a renewal keeps it.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Extend the lease to `ttl` from `now_unix_ms`. Fails with [`Error::LeaseLost`] when
    /// someone else wrote `LEASE` since this holder last did (it lapsed and was taken over).
    pub async fn renew(&mut self, now_unix_ms: u64) -> Result<()> {
        let mut record = self.record.clone();
        record.expires_unix_ms = now_unix_ms + self.ttl.as_millis() as u64;
        self.replace(record).await
    }

    /// Give the lease up (it stays with its incarnation, lapsed), so that the next coordinator
    /// need not wait for it to expire.
    pub async fn release(mut self) -> Result<()> {
        let mut record = self.record.clone();
        record.expires_unix_ms = 0;
        self.replace(record).await
    }

    async fn replace(&mut self, record: LeaseRecord) -> Result<()> {
        match write(&self.root, &record, Some(&self.version)).await {
            Ok(version) => {
                self.version = version;
                self.record = record;
                Ok(())
            }
            Err(Error::Storage(e)) if e.is_conflict() => {
                let by = read(&self.root)
                    .await
                    .ok()
                    .flatten()
                    .map_or_else(|| "nobody (LEASE was deleted)".to_string(), |(r, _)| r.holder);
                Err(Error::LeaseLost {
                    root: self.root.describe(""),
                    by,
                })
            }
            Err(e) => Err(e),
        }
    }
}

fn held(root: &Location, holder: String, expires_unix_ms: u64, now_unix_ms: u64) -> Error {
    Error::LeaseHeld {
        root: root.describe(""),
        holder,
        expires_in_s: expires_unix_ms.saturating_sub(now_unix_ms) as f64 / 1000.0,
    }
}

async fn read(root: &Location) -> Result<Option<(LeaseRecord, Version)>> {
    let Some((bytes, version)) = root.get_versioned(LEASE).await? else {
        return Ok(None);
    };
    let record = serde_json::from_slice(&bytes).map_err(|e| Error::Format {
        object: root.describe(LEASE),
        reason: format!("expected {{\"holder\", \"incarnation\", \"expires_unix_ms\"}}: {e}"),
    })?;
    Ok(Some((record, version)))
}

async fn write(root: &Location, record: &LeaseRecord, expected: Option<&Version>) -> Result<Version> {
    let text = serde_json::to_vec_pretty(record).map_err(|e| Error::Format {
        object: root.describe(LEASE),
        reason: e.to_string(),
    })?;
    Ok(root.put_if(LEASE, text, expected).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(incarnation: u64, expires_unix_ms: u64) -> LeaseRecord {
        LeaseRecord {
            holder: "a".into(),
            incarnation,
            expires_unix_ms,
        }
    }

    #[test]
    fn a_lease_is_free_when_absent_lapsed_or_released_and_held_otherwise() {
        assert_eq!(claim(None, 5), Claim::Take { incarnation: 1 });
        assert_eq!(
            claim(Some(&record(4, 1000)), 1000),
            Claim::Take { incarnation: 5 }
        );
        assert_eq!(claim(Some(&record(4, 0)), 10), Claim::Take { incarnation: 5 });
        assert_eq!(
            claim(Some(&record(4, 1001)), 1000),
            Claim::Held {
                holder: "a".into(),
                expires_unix_ms: 1001
            }
        );
    }
}
