//! Top-k prediction, as Keras's `decode_predictions` prints it.

use std::path::PathBuf;

use burn::tensor::activation::softmax;
use serde::Serialize;

use crate::error::Result;
use crate::image::{load_rgb, to_tensor};
use crate::modelfile::LoadedModel;

/// How many images go through the network at once.
const BATCH: usize = 8;

/// One of an image's top classes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopClass {
    /// Output index.
    pub index: usize,
    /// WordNet id, `null` for classes that are not ImageNet's.
    pub wnid: Option<String>,
    /// Class name.
    pub label: String,
    /// Softmax probability.
    pub prob: f32,
}

/// The top classes of one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The image path as given.
    pub image: String,
    /// Best class first.
    pub top: Vec<TopClass>,
}

/// Classify `images` with `model`, returning the `top_k` classes of each.
pub fn predict(
    model: &LoadedModel,
    images: &[PathBuf],
    top_k: usize,
    image_size: usize,
) -> Result<Vec<Prediction>> {
    let device = model.model.backbone.stem.conv.weight.device();
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(BATCH) {
        let pixels = chunk
            .iter()
            .map(|path| load_rgb(path, image_size))
            .collect::<Result<Vec<_>>>()?;
        let logits = model.model.forward(to_tensor(&pixels, image_size, &device));
        let classes = logits.dims()[1];
        let probs = softmax(logits, 1)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap_or_default();
        for (path, row) in chunk.iter().zip(probs.chunks_exact(classes)) {
            out.push(Prediction {
                image: path.display().to_string(),
                top: top_classes(model, row, top_k),
            });
        }
    }
    Ok(out)
}

fn top_classes(model: &LoadedModel, probs: &[f32], k: usize) -> Vec<TopClass> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .take(k)
        .map(|index| {
            let class = model.classes.get(index);
            TopClass {
                index,
                wnid: class.and_then(|c| c.wnid.clone()),
                label: class.map_or_else(|| format!("class {index}"), |c| c.label.clone()),
                prob: probs[index],
            }
        })
        .collect()
}

/// Human-readable rendering: the image, then one ranked line per class.
pub fn render_text(predictions: &[Prediction]) -> String {
    let mut s = String::new();
    for p in predictions {
        s.push_str(&p.image);
        s.push('\n');
        for (rank, c) in p.top.iter().enumerate() {
            let wnid = c.wnid.as_deref().map(|w| format!(" ({w})")).unwrap_or_default();
            s.push_str(&format!(
                "  {}. {:<7.4} {}{} [{}]\n",
                rank + 1,
                c.prob,
                c.label,
                wnid,
                c.index
            ));
        }
    }
    s
}
