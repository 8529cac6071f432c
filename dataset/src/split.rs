//! Train / validation / test splits and class-balanced limits.

use serde::{Deserialize, Serialize};

use crate::sampler::SplitMix64;

/// How the training data is divided.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitScheme {
    /// The official train and test sets, with validation carved from train: a seeded random
    /// `val_fraction` of it.
    Official {
        /// Fraction of the training set held out for validation.
        val_fraction: f64,
    },
    /// The tutorial's split, from the training set in file order: test = train[:10%],
    /// val = train[10%:25%], train = train[25%:]. The official test set is unused.
    Tutorial,
}

impl Default for SplitScheme {
    fn default() -> Self {
        SplitScheme::Official { val_fraction: 0.1 }
    }
}

/// Indices into a dataset's item list, per split.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Splits {
    /// Training items.
    pub train: Vec<usize>,
    /// Validation items.
    pub val: Vec<usize>,
    /// Test items.
    pub test: Vec<usize>,
}

/// Per-split caps on the number of items, applied class-balanced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Limits {
    /// Cap on training items.
    pub train: Option<usize>,
    /// Cap on validation items.
    pub val: Option<usize>,
    /// Cap on test items.
    pub test: Option<usize>,
}

/// Split `official_train` and `official_test` (item indices in file order) by `scheme`.
pub fn split(scheme: SplitScheme, official_train: &[usize], official_test: &[usize], seed: u64) -> Splits {
    match scheme {
        SplitScheme::Official { val_fraction } => {
            let mut shuffled = official_train.to_vec();
            let mut rng = SplitMix64::new(seed ^ 0x5EED_5B17);
            for i in (1..shuffled.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                shuffled.swap(i, j);
            }
            let n_val = ((official_train.len() as f64) * val_fraction.clamp(0.0, 1.0)).round() as usize;
            let mut val = shuffled[..n_val].to_vec();
            let mut train = shuffled[n_val..].to_vec();
            // Keep file order inside each split: reads coalesce better and the sampler shuffles
            // anyway.
            val.sort_unstable();
            train.sort_unstable();
            Splits {
                train,
                val,
                test: official_test.to_vec(),
            }
        }
        SplitScheme::Tutorial => {
            let n = official_train.len();
            // TFDS slicing "train[:10%]" rounds boundaries to the nearest item.
            let at = |pct: usize| (n * pct + 50) / 100;
            Splits {
                test: official_train[..at(10)].to_vec(),
                val: official_train[at(10)..at(25)].to_vec(),
                train: official_train[at(25)..].to_vec(),
            }
        }
    }
}

/// `items` in a seeded random order: what the tutorial split slices when the file order is
/// sorted by class (image folders), so that train[:10%] is a mix of classes, as it is in
/// CIFAR-10's own files, and not the first class alone.
pub fn mixed_order(items: &[usize], seed: u64) -> Vec<usize> {
    let mut mixed = items.to_vec();
    let mut rng = SplitMix64::new(seed ^ 0x0D0E_5EED_F01D);
    for i in (1..mixed.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        mixed.swap(i, j);
    }
    mixed
}

/// Keep at most `limit` of `items`, as evenly over classes as possible: round-robin over the
/// classes, taking each class's items in their split order.
pub fn balanced_limit(items: &[usize], labels: &[u16], limit: usize) -> Vec<usize> {
    if limit >= items.len() {
        return items.to_vec();
    }
    let classes = labels.iter().map(|&l| usize::from(l) + 1).max().unwrap_or(0);
    let mut per_class: Vec<std::collections::VecDeque<usize>> = vec![Default::default(); classes];
    for &i in items {
        per_class[usize::from(labels[i])].push_back(i);
    }
    let mut out = Vec::with_capacity(limit);
    while out.len() < limit {
        for queue in per_class.iter_mut() {
            if out.len() == limit {
                break;
            }
            if let Some(i) = queue.pop_front() {
                out.push(i);
            }
        }
    }
    out.sort_unstable();
    out
}

/// Apply `limits` to `splits`.
pub fn apply_limits(splits: Splits, labels: &[u16], limits: Limits) -> Splits {
    let cap = |items: Vec<usize>, limit: Option<usize>| match limit {
        Some(n) => balanced_limit(&items, labels, n),
        None => items,
    };
    Splits {
        train: cap(splits.train, limits.train),
        val: cap(splits.val, limits.val),
        test: cap(splits.test, limits.test),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_split_is_seeded_disjoint_and_complete() {
        let train: Vec<usize> = (0..1000).collect();
        let test: Vec<usize> = (1000..1200).collect();
        let s = split(SplitScheme::default(), &train, &test, 7);
        assert_eq!((s.train.len(), s.val.len(), s.test.len()), (900, 100, 200));
        let mut all: Vec<usize> = s.train.iter().chain(&s.val).copied().collect();
        all.sort_unstable();
        assert_eq!(all, train);
        assert_eq!(s, split(SplitScheme::default(), &train, &test, 7));
        assert_ne!(s.val, split(SplitScheme::default(), &train, &test, 8).val);
    }

    #[test]
    fn a_mixed_order_is_a_seeded_permutation_that_mixes_sorted_classes() {
        // 10 classes of 100 items each, sorted by class as image folders are.
        let items: Vec<usize> = (0..1000).collect();
        let mixed = mixed_order(&items, 3);
        assert_eq!(mixed, mixed_order(&items, 3));
        assert_ne!(mixed, mixed_order(&items, 4));
        let mut sorted = mixed.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, items);
        let s = split(SplitScheme::Tutorial, &mixed, &[], 0);
        let classes: std::collections::BTreeSet<usize> = s.test.iter().map(|i| i / 100).collect();
        assert_eq!(classes.len(), 10, "the tutorial's test slice holds every class");
    }

    #[test]
    fn tutorial_split_slices_train_in_order() {
        let train: Vec<usize> = (0..50_000).collect();
        let s = split(SplitScheme::Tutorial, &train, &[1, 2, 3], 0);
        assert_eq!(s.test, (0..5_000).collect::<Vec<_>>());
        assert_eq!(s.val, (5_000..12_500).collect::<Vec<_>>());
        assert_eq!(s.train.len(), 37_500);
        assert_eq!(s.train[0], 12_500);
    }

    #[test]
    fn limits_are_class_balanced() {
        // 3 classes with 10, 10 and 2 items.
        let labels: Vec<u16> = (0..22)
            .map(|i| {
                if i < 10 {
                    0
                } else if i < 20 {
                    1
                } else {
                    2
                }
            })
            .collect();
        let items: Vec<usize> = (0..22).collect();
        let kept = balanced_limit(&items, &labels, 9);
        let count = |c: u16| kept.iter().filter(|&&i| labels[i] == c).count();
        assert_eq!((count(0), count(1), count(2)), (4, 3, 2));
        assert_eq!(balanced_limit(&items, &labels, 100), items);
    }
}
