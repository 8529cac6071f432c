//! The image-folder layout: `train/<class>/<image>` and `test/<class>/<image>`, classes named
//! by their folders (sorted), images in JPEG or PNG.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};

/// Image file extensions recognised (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// One image of an image folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderItem {
    /// Path relative to the dataset root, `/`-separated.
    pub path: String,
    /// Class index.
    pub label: u16,
}

/// The images of an image folder, indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FolderIndex {
    /// Class names, sorted; the label is the position here.
    pub classes: Vec<String>,
    /// Training images, sorted by path.
    pub train: Vec<FolderItem>,
    /// Test images, sorted by path (empty when there is no `test/`).
    pub test: Vec<FolderItem>,
}

/// Build the index from every file path under the root (relative, `/`-separated), as a
/// directory walk or an object listing yields them. Files that are not images, and anything
/// outside `train/` and `test/`, are ignored.
pub fn index(root: &str, paths: impl IntoIterator<Item = String>) -> Result<FolderIndex> {
    let mut split: BTreeMap<&'static str, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut class_dirs: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    for path in paths {
        let parts: Vec<&str> = path.split('/').collect();
        let which = match parts.first() {
            Some(&"train") => "train",
            Some(&"test") => "test",
            _ => continue,
        };
        if parts.len() < 3 {
            continue;
        }
        class_dirs.entry(which).or_default().insert(parts[1].to_string());
        let is_image = parts[parts.len() - 1]
            .rsplit_once('.')
            .is_some_and(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()));
        if parts.len() == 3 && is_image {
            split
                .entry(which)
                .or_default()
                .entry(parts[1].to_string())
                .or_default()
                .push(path.clone());
        }
    }
    let err = |reason: String| Error::Format {
        file: root.to_string(),
        offset: 0,
        reason,
    };
    let train_dirs = class_dirs.get("train").cloned().unwrap_or_default();
    if train_dirs.is_empty() {
        return Err(err(
            "no train/<class>/ folders found: expected train/<class>/*.jpg|png".into(),
        ));
    }
    let classes: Vec<String> = train_dirs.into_iter().collect();
    if classes.len() > usize::from(u16::MAX) {
        return Err(err(format!(
            "{} classes; at most {} are supported",
            classes.len(),
            u16::MAX
        )));
    }
    let label_of: BTreeMap<&str, u16> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i as u16))
        .collect();
    let mut out = FolderIndex {
        classes: classes.clone(),
        train: Vec::new(),
        test: Vec::new(),
    };
    for which in ["train", "test"] {
        let dirs = class_dirs.get(which).cloned().unwrap_or_default();
        for class in &dirs {
            let Some(&label) = label_of.get(class.as_str()) else {
                return Err(err(format!(
                    "{which}/{class}/ has no matching train/{class}/ folder"
                )));
            };
            let mut files = split
                .get(which)
                .and_then(|s| s.get(class))
                .cloned()
                .unwrap_or_default();
            if files.is_empty() {
                return Err(err(format!(
                    "{which}/{class}/ holds no images (expected {} files)",
                    IMAGE_EXTENSIONS.join(", ")
                )));
            }
            files.sort();
            let items = files.into_iter().map(|path| FolderItem { path, label });
            if which == "train" {
                out.train.extend(items)
            } else {
                out.test.extend(items)
            }
        }
    }
    out.train.sort_by(|a, b| a.path.cmp(&b.path));
    out.test.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn classes_come_from_sorted_train_folders() {
        let idx = index(
            "data",
            paths(&[
                "train/dog/1.jpg",
                "train/cat/2.PNG",
                "train/cat/1.jpeg",
                "train/cat/notes.txt",
                "test/dog/9.png",
                "README.md",
            ]),
        )
        .unwrap();
        assert_eq!(idx.classes, ["cat", "dog"]);
        let train: Vec<(&str, u16)> = idx.train.iter().map(|i| (i.path.as_str(), i.label)).collect();
        assert_eq!(
            train,
            [
                ("train/cat/1.jpeg", 0),
                ("train/cat/2.PNG", 0),
                ("train/dog/1.jpg", 1)
            ]
        );
        assert_eq!(
            idx.test,
            [FolderItem {
                path: "test/dog/9.png".into(),
                label: 1
            }]
        );
    }

    #[test]
    fn bad_layouts_are_explained() {
        let e = index("/d", paths(&["images/a.jpg"])).unwrap_err().to_string();
        assert!(e.contains("/d") && e.contains("no train/<class>/ folders"), "{e}");
        let e = index("/d", paths(&["train/cat/a.jpg", "train/dog/readme.txt"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("train/dog/ holds no images"), "{e}");
        let e = index("/d", paths(&["train/cat/a.jpg", "test/cow/b.jpg"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("test/cow/ has no matching train/cow/"), "{e}");
    }
}
