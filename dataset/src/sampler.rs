//! Distributed sampling with PyTorch `DistributedSampler` semantics, plus a resumable,
//! re-splittable position.
//!
//! Each epoch has one global order: a permutation of `0..len` drawn from `(seed, epoch)`.
//! Training walks that order from the front: a step of `world` ranks with `batch` samples each
//! consumes the next `world * batch` positions. Rank `r` takes positions `r, r + world, ...`
//! of what remains (PyTorch's strided split), so on a fresh epoch the shards are exactly
//! `DistributedSampler`'s. Because every step consumes a prefix, the position is one number,
//! [`SamplerState::consumed`], and the rest of the epoch can be split over any number of ranks:
//! a ring that shrinks or grows mid-epoch continues without repeating or skipping a sample.

use serde::{Deserialize, Serialize};

/// How an epoch is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerConfig {
    /// Number of samples in the dataset split.
    pub len: usize,
    /// Seed of the run; the epoch number is mixed in.
    pub seed: u64,
    /// Shuffle each epoch (training) or keep the dataset order (evaluation).
    pub shuffle: bool,
    /// Drop the tail that does not fill every rank equally instead of padding it by wrapping
    /// around to the start of the epoch.
    pub drop_last: bool,
}

/// Where training stands inside an epoch: save it with a checkpoint, restore it to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SamplerState {
    /// The epoch, from 0.
    pub epoch: u64,
    /// Positions of the epoch's order already trained on.
    pub consumed: usize,
}

impl SamplerConfig {
    /// The epoch's global order of sample indices.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = SplitMix64::new(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            // Fisher-Yates, from the back.
            for i in (1..order.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
        }
        order
    }

    /// The sample indices rank `rank` of `world` takes for the rest of the epoch, from
    /// `state`, in the order it should train on them. Every rank gets the same count.
    ///
    /// # Panics
    /// When `world` is 0 or `rank >= world` (a programming error, not an input error).
    pub fn shard(&self, state: SamplerState, world: usize, rank: usize) -> Vec<usize> {
        assert!(world > 0 && rank < world, "rank {rank} of world {world}");
        let order = self.epoch_order(state.epoch);
        let rest = &order[state.consumed.min(order.len())..];
        let per_rank = self.per_rank(rest.len(), world);
        (0..per_rank)
            .map(|k| {
                let pos = k * world + rank;
                // Padding wraps around to the start of the epoch, as PyTorch pads with the
                // first indices.
                if pos < rest.len() {
                    rest[pos]
                } else {
                    order[(pos - rest.len()) % order.len()]
                }
            })
            .collect()
    }

    /// Samples each rank takes when `remaining` positions are split over `world` ranks.
    pub fn per_rank(&self, remaining: usize, world: usize) -> usize {
        if self.drop_last || remaining == 0 {
            remaining / world
        } else {
            remaining.div_ceil(world)
        }
    }

    /// Optimizer steps left in the epoch for `world` ranks of `batch` samples each.
    pub fn steps_left(&self, state: SamplerState, world: usize, batch: usize) -> usize {
        let remaining = self.len.saturating_sub(state.consumed);
        self.per_rank(remaining, world).div_ceil(batch)
    }

    /// The state after one step of `world` ranks with `batch` samples each.
    pub fn advance(&self, state: SamplerState, world: usize, batch: usize) -> SamplerState {
        let remaining = self.len.saturating_sub(state.consumed);
        let per_rank = self.per_rank(remaining, world);
        // The step's share of real (non-padding) positions.
        let taken = (batch.min(per_rank) * world).min(remaining);
        let consumed = state.consumed + taken;
        let done = (self.drop_last && remaining - taken < world) || consumed >= self.len;
        if done {
            SamplerState {
                epoch: state.epoch + 1,
                consumed: 0,
            }
        } else {
            SamplerState {
                epoch: state.epoch,
                consumed,
            }
        }
    }
}

/// One rank's share of one optimizer step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepShare {
    /// The sample indices this rank trains on in the step.
    pub indices: Vec<usize>,
    /// Samples in the step over all ranks (padding included): this rank's gradient weighs
    /// `indices.len() / step_total`.
    pub step_total: usize,
}

impl SamplerConfig {
    /// The rest of the epoch from `state` in steps of `global` positions (the global batch),
    /// and rank `rank`'s strided share of each, for a ring of `world`.
    ///
    /// The global batch does not depend on `world`, so a ring that shrinks mid-epoch takes
    /// the same steps over the same samples (only who computes which sample changes). When
    /// `world` divides `global` this is exactly [`shard`](Self::shard) cut into batches of
    /// `global / world`. The last step is padded (wrapping to the start of the epoch) to a
    /// multiple of `world`, or with `drop_last` the tail that cannot give every rank a
    /// sample is dropped.
    ///
    /// # Panics
    /// When `world` or `global` is 0 or `rank >= world` (programming errors).
    pub fn global_steps(
        &self,
        state: SamplerState,
        global: usize,
        world: usize,
        rank: usize,
    ) -> Vec<StepShare> {
        assert!(
            world > 0 && global > 0 && rank < world,
            "rank {rank} of world {world}, batch {global}"
        );
        let order = self.epoch_order(state.epoch);
        let rest = &order[state.consumed.min(order.len())..];
        let remaining = if self.drop_last {
            rest.len() / world * world
        } else {
            rest.len()
        };
        let mut steps = Vec::new();
        let mut start = 0;
        while start < remaining {
            let real = global.min(remaining - start);
            if self.drop_last && real < world {
                break;
            }
            let total = if real < global {
                real.div_ceil(world) * world
            } else {
                real
            };
            let indices = (rank..total)
                .step_by(world)
                .map(|j| {
                    let pos = start + j;
                    if pos < rest.len() {
                        rest[pos]
                    } else {
                        order[(pos - rest.len()) % order.len()]
                    }
                })
                .collect();
            steps.push(StepShare {
                indices,
                step_total: total,
            });
            start += real;
        }
        steps
    }

    /// Optimizer steps of global batch `global` in a whole epoch (the same for any ring
    /// without `drop_last`).
    pub fn global_steps_per_epoch(&self, global: usize, world: usize) -> usize {
        let usable = if self.drop_last {
            self.len / world * world
        } else {
            self.len
        };
        let full = usable / global.max(1);
        let tail = usable % global.max(1);
        full + usize::from(tail > 0 && !(self.drop_last && tail < world))
    }
}

/// Deal the samples of one global step (`shares[r]` is rank `r`'s share) again, so that each
/// lands on the rank `home` names for it. Shares may come out of unequal size: a rank weighs
/// its mean gradient by its share, so the step's average over the global batch is unchanged;
/// only which rank computes which sample moves. A rank that would be left with nothing takes
/// one sample from the largest share. The result is a function of its inputs alone, the same
/// on every rank.
///
/// A rank that keeps per-sample state between epochs (a feature cache) then sees the same
/// samples again, however the epoch's shuffle falls. (Keeping the shares' sizes instead left
/// about one image in eight away from home with two ranks of 16, and each of those cost a
/// backbone pass every epoch.)
pub fn deal_by_home(shares: &[Vec<usize>], home: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let world = shares.len();
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); world];
    for &item in shares.iter().flatten() {
        out[home(item) % world.max(1)].push(item);
    }
    for r in 0..world {
        if !out[r].is_empty() {
            continue;
        }
        let largest = (0..world).max_by_key(|&q| (out[q].len(), std::cmp::Reverse(q)));
        if let Some(q) = largest.filter(|&q| out[q].len() > 1)
            && let Some(item) = out[q].pop()
        {
            out[r].push(item);
        }
    }
    out
}

/// A sample's home rank in a ring of `world`: a fixed hash of its index.
pub fn home_rank(index: usize, world: usize) -> usize {
    (SplitMix64::new(index as u64).next_u64() % world.max(1) as u64) as usize
}

/// SplitMix64 (Steele, Lea and Flood, 2014): tiny, fast, and fixed forever, so a seed gives
/// the same order in every version of this crate and every process.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for the
    /// sizes used here).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A uniform float in `[0, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn cfg(len: usize, drop_last: bool) -> SamplerConfig {
        SamplerConfig {
            len,
            seed: 42,
            shuffle: true,
            drop_last,
        }
    }

    #[test]
    fn dealing_by_home_keeps_every_sample_and_sends_each_home() {
        let c = cfg(103, false);
        let state = SamplerState {
            epoch: 3,
            consumed: 0,
        };
        let world = 3;
        let shares: Vec<Vec<StepShare>> = (0..world).map(|r| c.global_steps(state, 20, world, r)).collect();
        for step in 0..shares[0].len() {
            let before: Vec<Vec<usize>> = shares.iter().map(|s| s[step].indices.clone()).collect();
            let after = deal_by_home(&before, |i| home_rank(i, world));
            let mut a: Vec<usize> = before.concat();
            let mut b: Vec<usize> = after.concat();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "the same samples, step {step}");
            // Every sample at home, but for one per rank that no sample of the step calls
            // home (each rank computes something).
            let homeless = (0..world)
                .filter(|&r| a.iter().all(|&i| home_rank(i, world) != r))
                .count();
            let away: usize = (0..world)
                .map(|r| after[r].iter().filter(|&&i| home_rank(i, world) != r).count())
                .sum();
            assert_eq!(away, homeless, "step {step}: {after:?}");
            assert!(
                after.iter().all(|share| !share.is_empty()),
                "step {step}: {after:?}"
            );
            assert_eq!(after, deal_by_home(&before, |i| home_rank(i, world)));
        }
        // A rank whose home has no sample in the step takes one from the largest share.
        let after = deal_by_home(&[vec![0, 1], vec![2, 3]], |_| 0);
        assert_eq!(after, [vec![0, 1, 2], vec![3]]);
        // One rank: nothing moves.
        let one = vec![vec![5, 1, 4]];
        assert_eq!(deal_by_home(&one, |i| home_rank(i, 1)), one);
    }

    #[test]
    fn matches_pytorch_strided_split_on_a_fresh_epoch() {
        let c = SamplerConfig {
            len: 10,
            seed: 0,
            shuffle: false,
            drop_last: false,
        };
        let s = SamplerState::default();
        // torch DistributedSampler(shuffle=False, num_replicas=3): pad with [0, 1], stride 3.
        assert_eq!(c.shard(s, 3, 0), [0, 3, 6, 9]);
        assert_eq!(c.shard(s, 3, 1), [1, 4, 7, 0]);
        assert_eq!(c.shard(s, 3, 2), [2, 5, 8, 1]);
        let d = SamplerConfig { drop_last: true, ..c };
        assert_eq!(d.shard(s, 3, 2), [2, 5, 8]);
    }

    #[test]
    fn global_steps_equal_shard_batches_when_the_world_divides_the_batch() {
        for (len, world, batch, consumed) in [(100, 2, 8, 0), (101, 3, 4, 0), (77, 4, 5, 40), (10, 3, 1, 3)] {
            let c = cfg(len, false);
            let state = SamplerState { epoch: 2, consumed };
            for rank in 0..world {
                let old: Vec<Vec<usize>> = c
                    .shard(state, world, rank)
                    .chunks(batch)
                    .map(<[usize]>::to_vec)
                    .collect();
                let new: Vec<Vec<usize>> = c
                    .global_steps(state, batch * world, world, rank)
                    .into_iter()
                    .map(|s| s.indices)
                    .collect();
                assert_eq!(old, new, "len {len} world {world} batch {batch} rank {rank}");
            }
        }
    }

    #[test]
    fn a_smaller_ring_takes_the_same_steps_over_the_same_samples() {
        let c = cfg(50, false);
        let state = SamplerState {
            epoch: 1,
            consumed: 12,
        };
        let steps_of = |world: usize| -> Vec<Vec<usize>> {
            let shares: Vec<Vec<StepShare>> =
                (0..world).map(|r| c.global_steps(state, 12, world, r)).collect();
            (0..shares[0].len())
                .map(|i| {
                    let mut step: Vec<usize> = shares.iter().flat_map(|s| s[i].indices.clone()).collect();
                    step.sort_unstable();
                    for s in &shares {
                        assert_eq!(s[i].step_total, shares[0][i].step_total);
                    }
                    step
                })
                .collect()
        };
        // 38 positions left: steps of 12, 12, 12 and a tail of 2.
        let three = steps_of(3);
        let two = steps_of(2);
        assert_eq!(three.len(), 4);
        assert_eq!(three[..3], two[..3]);
        assert!(three.iter().take(3).all(|s| s.len() == 12));
        // The tail pads to a multiple of the ring: 3 for three ranks, 2 for two.
        assert_eq!((three[3].len(), two[3].len()), (3, 2));
        // 12 over 5 ranks: shares of 3, 3, 2, 2, 2.
        let five: Vec<usize> = (0..5)
            .map(|r| c.global_steps(state, 12, 5, r)[0].indices.len())
            .collect();
        assert_eq!(five, [3, 3, 2, 2, 2]);
        assert_eq!(c.global_steps_per_epoch(12, 3), 5);
        assert_eq!(
            c.global_steps(
                SamplerState {
                    epoch: 1,
                    consumed: 0
                },
                12,
                3,
                0
            )
            .len(),
            5
        );
    }

    #[test]
    fn epochs_differ_and_seeds_reproduce() {
        let c = cfg(1000, false);
        assert_ne!(c.epoch_order(0), c.epoch_order(1));
        assert_eq!(c.epoch_order(3), cfg(1000, false).epoch_order(3));
        let mut sorted = c.epoch_order(5);
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    }

    /// Train `steps` steps with `world` ranks, returning what each step took.
    fn train(
        c: &SamplerConfig,
        mut state: SamplerState,
        world: usize,
        batch: usize,
        steps: usize,
    ) -> (Vec<usize>, SamplerState) {
        let mut seen = Vec::new();
        for _ in 0..steps {
            for rank in 0..world {
                let shard = c.shard(state, world, rank);
                seen.extend(shard.iter().take(batch));
            }
            state = c.advance(state, world, batch);
        }
        (seen, state)
    }

    proptest! {
        #[test]
        fn shards_are_disjoint_equal_and_cover_the_epoch(len in 1usize..300, world in 1usize..9, drop_last: bool) {
            let c = cfg(len, drop_last);
            let s = SamplerState::default();
            let shards: Vec<Vec<usize>> = (0..world).map(|r| c.shard(s, world, r)).collect();
            let n = shards[0].len();
            prop_assert!(shards.iter().all(|sh| sh.len() == n), "equal counts");
            let mut counts = BTreeMap::new();
            for i in shards.iter().flatten() { *counts.entry(*i).or_insert(0usize) += 1; }
            if drop_last {
                prop_assert_eq!(counts.len(), n * world);
                prop_assert!(counts.values().all(|&c| c == 1), "disjoint");
                prop_assert!(len - n * world < world, "drops less than one round");
            } else {
                prop_assert_eq!(counts.len(), len, "union covers the epoch");
                let dups: usize = counts.values().map(|c| c - 1).sum();
                prop_assert!(dups < world, "only the padding repeats");
            }
            prop_assert_eq!(&shards[0], &c.shard(s, world, 0), "deterministic");
        }

        #[test]
        fn resplitting_mid_epoch_neither_repeats_nor_skips(
            len in 1usize..400, w1 in 1usize..6, w2 in 1usize..6, batch in 1usize..9, k in 0usize..20,
        ) {
            let c = cfg(len, false);
            let k = k.min(c.steps_left(SamplerState::default(), w1, batch));
            let (mut seen, state) = train(&c, SamplerState::default(), w1, batch, k);
            if state.epoch == 0 {
                prop_assert_eq!(state.consumed, (k * batch * w1).min(len));
                let steps = c.steps_left(state, w2, batch);
                let (rest, end) = train(&c, state, w2, batch, steps);
                seen.extend(rest);
                prop_assert_eq!(end, SamplerState { epoch: 1, consumed: 0 }, "the epoch ends exactly");
            }
            let mut counts = BTreeMap::new();
            for i in &seen { *counts.entry(*i).or_insert(0usize) += 1; }
            prop_assert_eq!(counts.len(), len, "every sample seen");
            let dups: usize = counts.values().map(|c| c - 1).sum();
            prop_assert!(dups < w1.max(w2), "only padding repeats: {} duplicates", dups);
        }

        #[test]
        fn a_saved_state_resumes_the_same_shards(len in 1usize..300, world in 1usize..5, batch in 1usize..8, k in 0usize..10) {
            let c = cfg(len, false);
            let (_, state) = train(&c, SamplerState::default(), world, batch, k);
            let json = serde_json::to_string(&state).unwrap();
            let restored: SamplerState = serde_json::from_str(&json).unwrap();
            for r in 0..world {
                prop_assert_eq!(c.shard(restored, world, r), c.shard(state, world, r));
            }
        }
    }
}
