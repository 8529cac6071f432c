//! The 1000 ImageNet-1k classes in the order every ImageNet classifier uses, with WordNet ids
//! (the data behind Keras's `decode_predictions`).
//!
//! Labels are the first WordNet lemma of each synset, from the `imagenet_synsets.txt` and
//! `imagenet_synset_to_lemma.txt` files that the timm package ships (Apache-2.0).

const CLASSES_TSV: &str = include_str!("../data/imagenet_classes.tsv");

/// One ImageNet class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagenetClass {
    /// WordNet id, e.g. `n02123045`.
    pub wnid: &'static str,
    /// Human-readable label, e.g. `tabby`.
    pub label: &'static str,
}

/// The 1000 classes, indexed by logit position.
pub fn classes() -> Vec<ImagenetClass> {
    CLASSES_TSV
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(wnid, label)| ImagenetClass { wnid, label })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_1000_distinct_wnids_in_standard_order() {
        let classes = classes();
        assert_eq!(classes.len(), 1000);
        assert_eq!(
            classes[0],
            ImagenetClass {
                wnid: "n01440764",
                label: "tench"
            }
        );
        assert_eq!(
            classes[281],
            ImagenetClass {
                wnid: "n02123045",
                label: "tabby"
            }
        );
        assert_eq!(classes[999].wnid, "n15075141");
        let distinct: std::collections::BTreeSet<_> = classes.iter().map(|c| c.wnid).collect();
        assert_eq!(distinct.len(), 1000);
    }
}
