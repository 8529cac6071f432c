//! The official CIFAR-10 binary format: records of one label byte and 3072 pixel bytes (the
//! R, G and B planes of a 32x32 image, row-major).

use crate::error::{Error, Result};

/// Side of a CIFAR image.
pub const SIDE: usize = 32;
/// Bytes of one record: label, then 3 planes of 32x32.
pub const RECORD: usize = 1 + 3 * SIDE * SIDE;
/// Number of classes.
pub const CLASSES: usize = 10;
/// Training batch files, in order.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch file.
pub const TEST_FILE: &str = "test_batch.bin";
/// The class-name file.
pub const META_FILE: &str = "batches.meta.txt";
/// Class names of the official release, used when the meta file is absent.
pub const CLASS_NAMES: [&str; CLASSES] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Number of records in a batch file of `size` bytes, or an error naming the file when the
/// size is not a whole number of records.
pub fn record_count(file: &str, size: u64) -> Result<usize> {
    let record = RECORD as u64;
    if size == 0 || !size.is_multiple_of(record) {
        return Err(Error::Format {
            file: file.to_string(),
            offset: size - size % record,
            reason: format!(
                "file is {size} bytes, not a whole number of {RECORD}-byte records \
                 ({} full records and {} extra bytes): truncated or not a CIFAR-10 batch file",
                size / record,
                size % record
            ),
        });
    }
    Ok((size / record) as usize)
}

/// Decode one record into its label and interleaved RGB pixels (32x32x3).
pub fn decode_record(file: &str, index: usize, bytes: &[u8]) -> Result<(u16, Vec<u8>)> {
    let offset = (index * RECORD) as u64;
    if bytes.len() != RECORD {
        return Err(Error::Format {
            file: file.to_string(),
            offset,
            reason: format!("record {index} has {} bytes, expected {RECORD}", bytes.len()),
        });
    }
    let label = bytes[0];
    if usize::from(label) >= CLASSES {
        return Err(Error::Format {
            file: file.to_string(),
            offset,
            reason: format!("record {index} has label {label}, expected 0..{}", CLASSES - 1),
        });
    }
    let plane = SIDE * SIDE;
    let planes = &bytes[1..];
    let mut rgb = Vec::with_capacity(3 * plane);
    for p in 0..plane {
        rgb.extend_from_slice(&[planes[p], planes[plane + p], planes[2 * plane + p]]);
    }
    Ok((u16::from(label), rgb))
}

/// Read only the labels of a whole batch file's bytes (for indexing without decoding).
pub fn labels(file: &str, bytes: &[u8]) -> Result<Vec<u16>> {
    let n = record_count(file, bytes.len() as u64)?;
    (0..n)
        .map(|i| {
            let label = bytes[i * RECORD];
            if usize::from(label) >= CLASSES {
                Err(Error::Format {
                    file: file.to_string(),
                    offset: (i * RECORD) as u64,
                    reason: format!("record {i} has label {label}, expected 0..{}", CLASSES - 1),
                })
            } else {
                Ok(u16::from(label))
            }
        })
        .collect()
}

/// Class names from `batches.meta.txt`: one per line, blank lines ignored.
pub fn parse_meta(file: &str, text: &str) -> Result<Vec<String>> {
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != CLASSES {
        return Err(Error::Format {
            file: file.to_string(),
            offset: 0,
            reason: format!("expected {CLASSES} class names, found {}", names.len()),
        });
    }
    Ok(names)
}

/// Encode a record (for tests and for converting image folders to the binary layout).
pub fn encode_record(label: u8, rgb: &[u8]) -> Vec<u8> {
    let plane = SIDE * SIDE;
    let mut out = vec![0u8; RECORD];
    out[0] = label;
    for p in 0..plane {
        for c in 0..3 {
            out[1 + c * plane + p] = rgb[p * 3 + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn records_round_trip() {
        let rgb: Vec<u8> = (0..3 * SIDE * SIDE).map(|i| (i * 7 % 251) as u8).collect();
        let rec = encode_record(7, &rgb);
        assert_eq!(rec[1], rgb[0], "red plane first");
        assert_eq!(rec[1 + SIDE * SIDE], rgb[1], "then green");
        assert_eq!(decode_record("f", 0, &rec).unwrap(), (7, rgb));
    }

    #[test]
    fn errors_name_file_record_and_offset() {
        let err = record_count("data_batch_1.bin", 3073 * 2 + 5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data_batch_1.bin") && err.contains("offset 6146"),
            "{err}"
        );
        assert!(err.contains("2 full records and 5 extra bytes"), "{err}");
        let mut rec = encode_record(3, &vec![0; 3072]);
        rec[0] = 10;
        let err = decode_record("test_batch.bin", 4, &rec).unwrap_err().to_string();
        assert!(
            err.contains("record 4 has label 10") && err.contains("offset 12292"),
            "{err}"
        );
        assert!(
            parse_meta("batches.meta.txt", "a\nb\n")
                .unwrap_err()
                .to_string()
                .contains("found 2")
        );
    }

    proptest! {
        /// The parser never panics, whatever the bytes: every input is records or an error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..8000)) {
            match labels("fuzz.bin", &bytes) {
                Ok(l) => {
                    prop_assert_eq!(l.len() * RECORD, bytes.len());
                    for (i, chunk) in bytes.chunks(RECORD).enumerate() {
                        prop_assert!(decode_record("fuzz.bin", i, chunk).is_ok());
                    }
                }
                Err(e) => prop_assert!(e.to_string().contains("fuzz.bin")),
            }
            let _ = parse_meta("fuzz.txt", &String::from_utf8_lossy(&bytes));
        }
    }
}
