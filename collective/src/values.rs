//! The values of a piece in their wire encoding, and the element loops that read them.
//!
//! A piece that arrives over the network is a list of byte segments (HTTP/2 frames cut it
//! wherever they like, even inside a value); the loops here add or copy straight from those
//! segments, so a received piece is never assembled into one buffer first. A piece this rank
//! sends is one buffer it filled itself; a piece it forwards keeps the segments it arrived in.

use bytes::Bytes;

/// How values are laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Little-endian IEEE f32, 4 bytes a value.
    F32,
    /// Little-endian bfloat16 (the top half of an f32), 2 bytes a value.
    Bf16,
}

impl Encoding {
    /// Bytes per value.
    pub fn width(self) -> usize {
        match self {
            Encoding::F32 => 4,
            Encoding::Bf16 => 2,
        }
    }
}

/// Values in their wire encoding, possibly split over several byte segments.
#[derive(Debug, Clone, PartialEq)]
pub struct Values {
    encoding: Encoding,
    segments: Vec<Bytes>,
    len: usize,
}

/// f32 values kept as their little-endian bit patterns, so the allocation's bytes are the
/// wire bytes on any machine (and it stays 4-byte aligned for the loops that fill it).
/// Its buffer goes back to the pool when the last view of it is dropped.
struct LeWords(Vec<u32>);

impl AsRef<[u8]> for LeWords {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

impl Drop for LeWords {
    fn drop(&mut self) {
        pool::give(std::mem::take(&mut self.0));
    }
}

/// bfloat16 values as little-endian bit patterns.
struct LeHalves(Vec<u16>);

/// f32 buffers handed back once the transport has written them. A collective sends a fresh
/// buffer per piece; allocations that size come from the kernel zeroed, page by page, which
/// cost more than the sums. Reused, they are already mapped.
mod pool {
    use std::sync::Mutex;

    /// Bytes kept for reuse at most (beyond it, buffers are freed).
    const KEEP_BYTES: usize = 64 << 20;

    static FREE: Mutex<Vec<Vec<u32>>> = Mutex::new(Vec::new());

    /// An empty buffer with room for `len` words.
    pub fn take(len: usize) -> Vec<u32> {
        let reused = FREE.lock().ok().and_then(|mut free| {
            let at = free.iter().rposition(|w| w.capacity() >= len)?;
            Some(free.swap_remove(at))
        });
        let mut words = reused.unwrap_or_else(|| Vec::with_capacity(len));
        words.clear();
        words
    }

    /// Keep `words` for a later [`take`], if there is room.
    pub fn give(words: Vec<u32>) {
        if words.capacity() == 0 {
            return;
        }
        if let Ok(mut free) = FREE.lock() {
            let kept: usize = free.iter().map(|w| w.capacity() * 4).sum();
            if kept + words.capacity() * 4 <= KEEP_BYTES {
                free.push(words);
            }
        }
    }
}

impl AsRef<[u8]> for LeHalves {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

impl Values {
    /// Encode `values` (one copy; bf16 rounds each value to nearest even).
    pub fn encode(values: &[f32], encoding: Encoding) -> Self {
        let bytes = match encoding {
            Encoding::F32 => {
                let mut words = pool::take(values.len());
                words.extend(values.iter().map(|v| v.to_bits().to_le()));
                Bytes::from_owner(LeWords(words))
            }
            Encoding::Bf16 => {
                let halves: Vec<u16> = values.iter().map(|&v| crate::to_bf16_bits(v).to_le()).collect();
                Bytes::from_owner(LeHalves(halves))
            }
        };
        Self {
            encoding,
            segments: vec![bytes],
            len: values.len(),
        }
    }

    /// Values from wire segments; their total length must be a whole number of values.
    pub fn from_wire(encoding: Encoding, segments: Vec<Bytes>) -> Result<Self, String> {
        let bytes: usize = segments.iter().map(Bytes::len).sum();
        if !bytes.is_multiple_of(encoding.width()) {
            return Err(format!(
                "{bytes} bytes is not a whole number of {encoding:?} values ({} bytes each)",
                encoding.width()
            ));
        }
        Ok(Self {
            encoding,
            segments,
            len: bytes / encoding.width(),
        })
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The wire encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The wire bytes, in order.
    pub fn segments(&self) -> &[Bytes] {
        &self.segments
    }

    /// Bytes on the wire.
    pub fn byte_len(&self) -> usize {
        self.len * self.encoding.width()
    }

    /// The values as f32.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len];
        self.copy_into(&mut out);
        out
    }

    /// `dst = values` (same length).
    pub fn copy_into(&self, dst: &mut [f32]) {
        self.zip_into(dst, |d, v| *d = v);
    }

    /// `dst += values` (same length).
    pub fn add_into(&self, dst: &mut [f32]) {
        self.zip_into(dst, |d, v| *d += v);
    }

    /// `op(dst[i], values[i])` for every value, decoded from the wire as it is read.
    #[inline(always)]
    fn zip_into(&self, dst: &mut [f32], op: impl Fn(&mut f32, f32)) {
        debug_assert_eq!(dst.len(), self.len);
        match self.encoding {
            Encoding::F32 => for_each_run::<4>(&self.segments, |at, run| {
                for (d, b) in dst[at..at + run.len()].iter_mut().zip(run) {
                    op(d, f32::from_le_bytes(*b));
                }
            }),
            Encoding::Bf16 => for_each_run::<2>(&self.segments, |at, run| {
                for (d, b) in dst[at..at + run.len()].iter_mut().zip(run) {
                    op(d, from_bf16_bytes(*b));
                }
            }),
        }
    }

    /// `mine + values`, encoded for the wire in `encoding`, in one pass over the data when
    /// both are f32: the partial sum a reduce-scatter forwards, never written to `mine`.
    pub fn plus(&self, mine: &[f32], encoding: Encoding) -> Values {
        debug_assert_eq!(mine.len(), self.len);
        match (self.encoding, encoding) {
            (Encoding::F32, Encoding::F32) => {
                let mut words = pool::take(self.len);
                for_each_run::<4>(&self.segments, |at, run| {
                    words.extend(
                        mine[at..at + run.len()]
                            .iter()
                            .zip(run)
                            .map(|(m, b)| (m + f32::from_le_bytes(*b)).to_bits().to_le()),
                    );
                });
                Self {
                    encoding,
                    segments: vec![Bytes::from_owner(LeWords(words))],
                    len: self.len,
                }
            }
            _ => {
                let mut sum = mine.to_vec();
                self.add_into(&mut sum);
                Values::encode(&sum, encoding)
            }
        }
    }
}

fn from_bf16_bytes(b: [u8; 2]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)
}

/// Call `f(index, values)` over the segments' values in order, `index` counting values from
/// the start. Whole values inside a segment come as one run (the loops over a run vectorise);
/// a value split between segments is put together and passed alone.
fn for_each_run<const W: usize>(segments: &[Bytes], mut f: impl FnMut(usize, &[[u8; W]])) {
    let mut at = 0;
    let mut partial = [0u8; W];
    let mut have = 0;
    for segment in segments {
        let mut bytes: &[u8] = segment;
        if have > 0 {
            let take = (W - have).min(bytes.len());
            partial[have..have + take].copy_from_slice(&bytes[..take]);
            have += take;
            bytes = &bytes[take..];
            if have < W {
                continue;
            }
            f(at, std::slice::from_ref(&partial));
            at += 1;
        }
        let (run, rest) = bytes.as_chunks::<W>();
        if !run.is_empty() {
            f(at, run);
            at += run.len();
        }
        partial[..rest.len()].copy_from_slice(rest);
        have = rest.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// The same bytes cut at every `cut`-th byte (values straddle segments unless cut % 4 == 0).
    fn cut(bytes: &[u8], cut: usize) -> Vec<Bytes> {
        bytes.chunks(cut).map(Bytes::copy_from_slice).collect()
    }

    #[test]
    fn values_cut_anywhere_copy_add_and_sum_like_whole_ones() {
        let values: Vec<f32> = (0..37).map(|i| i as f32 * 0.75 - 9.0).collect();
        let mine: Vec<f32> = (0..37).map(|i| (i * 7 % 11) as f32 + 0.125).collect();
        let want_sum: Vec<f32> = mine.iter().zip(&values).map(|(m, v)| m + v).collect();
        let bytes = wire(&values);
        for step in [1, 2, 3, 4, 5, 7, 64, 1000] {
            let v = Values::from_wire(Encoding::F32, cut(&bytes, step)).unwrap();
            assert_eq!(v.len(), 37);
            assert_eq!(v.to_vec(), values, "cut every {step} bytes");
            let mut dst = mine.clone();
            v.add_into(&mut dst);
            assert_eq!(dst, want_sum, "cut every {step} bytes");
            assert_eq!(
                v.plus(&mine, Encoding::F32).to_vec(),
                want_sum,
                "cut every {step} bytes"
            );
        }
    }

    #[test]
    fn bf16_values_cut_anywhere_decode_alike() {
        let values: Vec<f32> = (0..9).map(|i| i as f32 * 1.5 - 3.0).collect();
        let whole = Values::encode(&values, Encoding::Bf16);
        assert_eq!(whole.byte_len(), 18);
        let bytes: Vec<u8> = whole.segments().iter().flat_map(|s| s.to_vec()).collect();
        for step in [1, 3, 5] {
            let v = Values::from_wire(Encoding::Bf16, cut(&bytes, step)).unwrap();
            assert_eq!(v.to_vec(), whole.to_vec());
        }
        // These values are exact in bf16.
        assert_eq!(whole.to_vec(), values);
    }

    #[test]
    fn encoded_bytes_are_little_endian_f32() {
        let values = [1.5f32, -0.0, f32::MAX, 3.25e-20];
        let v = Values::encode(&values, Encoding::F32);
        let bytes: Vec<u8> = v.segments().iter().flat_map(|s| s.to_vec()).collect();
        assert_eq!(bytes, wire(&values));
        assert!(v.to_vec()[1].is_sign_negative());
    }

    #[test]
    fn a_partial_value_is_refused() {
        let err = Values::from_wire(Encoding::F32, vec![Bytes::from_static(&[1, 2, 3])]).unwrap_err();
        assert!(
            err.contains("3 bytes is not a whole number of F32 values"),
            "{err}"
        );
        assert!(Values::from_wire(Encoding::Bf16, vec![Bytes::from_static(&[1])]).is_err());
    }
}
