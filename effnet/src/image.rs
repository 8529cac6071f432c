//! Decoding images into model input.

use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use image::imageops::FilterType;

use crate::error::{Error, Result};

/// Decode a JPEG or PNG file and resize it (bilinear, aspect ratio not kept, as Keras's
/// `load_img(target_size=...)` does) to `size` x `size` RGB.
pub fn load_rgb(path: &Path, size: usize) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = image::load_from_memory(&bytes).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let side = u32::try_from(size).map_err(|_| Error::Image {
        path: path.to_path_buf(),
        reason: format!("requested size {size} is too large"),
    })?;
    let rgb = img.resize_exact(side, side, FilterType::Triangle).to_rgb8();
    Ok(rgb.into_raw())
}

/// Stack interleaved RGB images of `size` x `size` into a `[batch, 3, size, size]` tensor of
/// raw 0..255 values.
pub fn to_tensor(images: &[Vec<u8>], size: usize, device: &Device) -> Tensor<4> {
    let plane = size * size;
    let mut data = vec![0f32; images.len() * 3 * plane];
    for (n, img) in images.iter().enumerate() {
        let out = &mut data[n * 3 * plane..(n + 1) * 3 * plane];
        for (p, px) in img.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = f32::from(px[c]);
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [images.len(), 3, size, size]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_pixels_become_planes() {
        let device = Device::flex();
        let img = vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let t = to_tensor(&[img], 2, &device);
        let v = t.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(v, [1., 4., 7., 10., 2., 5., 8., 11., 3., 6., 9., 12.]);
    }

    #[test]
    fn undecodable_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.jpg");
        std::fs::write(&path, b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
        let err = load_rgb(&path, 8).unwrap_err().to_string();
        assert!(err.contains("broken.jpg"), "{err}");
        assert!(err.starts_with("cannot decode image"), "{err}");
    }
}
