//! Evaluation: loss, accuracy and confusion over a split (from the feature cache where it
//! holds the backbone's outputs), and the prediction grid of the test images.

use super::*;

/// Totals of one pass over a split.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    /// Sum of per-image losses.
    pub loss_sum: f64,
    /// Correct top-1 predictions.
    pub correct: u64,
    /// Images seen.
    pub count: u64,
    /// Row-major confusion matrix (rows: actual), when asked for.
    pub confusion: Vec<u64>,
}

impl Trainer {
    /// Loss, accuracy and confusion of the model on the whole test split.
    pub fn evaluate_test(&self) -> Result<Totals> {
        let loaded = self
            .model
            .as_ref()
            .ok_or_else(|| Error::Internal("no model to evaluate".into()))?;
        self.evaluate(&loaded.model.clone().valid(), &self.splits.test, true)
    }

    /// Loss and accuracy of `model` (inference mode) on `items`.
    pub fn evaluate(&self, model: &Classifier, items: &[usize], confusion: bool) -> Result<Totals> {
        self.evaluate_with(model, items, confusion, None)
    }

    /// [`evaluate`](Self::evaluate), taking the backbone's outputs from `cache` when given
    /// (phase 1: `model` has the frozen backbone the cache was filled with).
    pub(super) fn evaluate_with(
        &self,
        model: &Classifier,
        items: &[usize],
        confusion: bool,
        mut cache: Option<&mut FeatureCache>,
    ) -> Result<Totals> {
        let classes = self.classes();
        let mut totals = Totals {
            confusion: if confusion {
                vec![0; classes * classes]
            } else {
                Vec::new()
            },
            ..Totals::default()
        };
        if items.is_empty() {
            return Ok(totals);
        }
        let device = self.device.clone().inner();
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        let prefetch = Prefetcher::spawn(
            self.dataset.clone(),
            batches(items, self.config.batch_size as usize),
            PREFETCH,
        )
        .map_err(|source| Error::data_read(&self.config.data, source))?;
        for batch in prefetch {
            let batch = batch.map_err(|source| Error::data_read(&self.config.data, source))?;
            let size = self.config.image_size as usize;
            let transfers = &self.transfers;
            let labels = labels(transfers, &batch.samples, &device);
            let logits = match cache.as_deref_mut() {
                Some(cache) => model.head.forward(cached_head_input(
                    transfers,
                    cache,
                    model,
                    &batch,
                    &[],
                    size,
                    &device,
                )?),
                None => model.forward(to_input(transfers, &batch.samples, size, &[], &device)),
            };
            let n = batch.samples.len() as u64;
            // The batch's mean loss and its predictions come back in one copy.
            let loss = loss_fn.forward(logits.clone(), labels);
            let both = Tensor::cat(vec![loss, logits.argmax(1).reshape([-1]).float()], 0);
            let values = transfers.download_f32(both)?;
            let (loss, predicted) = values
                .split_first()
                .ok_or_else(|| Error::Transfer("the device returned no loss".into()))?;
            totals.loss_sum += f64::from(*loss) * n as f64;
            let predicted: Vec<i64> = predicted.iter().map(|&p| p as i64).collect();
            for (sample, p) in batch.samples.iter().zip(predicted) {
                let actual = usize::from(sample.label);
                let p = p as usize;
                totals.correct += u64::from(actual == p);
                if confusion && actual < classes && p < classes {
                    totals.confusion[actual * classes + p] += 1;
                }
            }
            totals.count += n;
        }
        Ok(totals)
    }

    /// Predict the first 25 test images with the current model and draw them in a 5 x 5 grid,
    /// titled with the actual and predicted classes, into `path` (PNG).
    pub fn prediction_grid(&self) -> Result<Option<Vec<u8>>> {
        let loaded = self
            .model
            .as_ref()
            .ok_or_else(|| Error::Internal("no model to draw predictions with".into()))?;
        let items: Vec<usize> = self.splits.test.iter().take(25).copied().collect();
        if items.is_empty() {
            return Ok(None);
        }
        let handle = Handle::current();
        let samples = handle
            .block_on(self.dataset.read(&items))
            .map_err(|source| Error::data_read(&self.config.data, source))?;
        let device = self.device.clone().inner();
        let model = loaded.model.valid();
        let x = to_input(
            &self.transfers,
            &samples,
            self.config.image_size as usize,
            &[],
            &device,
        );
        let predicted = self
            .transfers
            .download(model.forward(x).argmax(1))?
            .convert::<i64>()
            .try_to_vec::<i64>()
            .map_err(|e| Error::Transfer(format!("predicted classes: {e:?}")))?;
        let name = |i: usize| {
            self.dataset
                .classes
                .get(i)
                .cloned()
                .unwrap_or_else(|| i.to_string())
        };
        let predictions: Vec<plots::Prediction> = samples
            .into_iter()
            .zip(predicted)
            .map(|(s, p)| plots::Prediction {
                actual: name(usize::from(s.label)),
                predicted: name(p as usize),
                width: s.width as u32,
                height: s.height as u32,
                rgb: s.rgb,
            })
            .collect();
        plots::prediction_grid_png(&predictions)
            .map(Some)
            .map_err(Error::Plot)
    }
}
