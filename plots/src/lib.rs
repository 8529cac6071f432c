//! PNG charts of a run, as the tutorial shows them: learning curves (loss and accuracy, train
//! and validation, with the phase boundary marked) and a grid of test images titled with the
//! actual and predicted class.
//!
//! Text is drawn with DejaVu Sans embedded in the binary (`assets/`, Bitstream Vera license),
//! so charts render the same on a machine without fonts, such as a container.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong while drawing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The drawing library failed.
    #[error("cannot draw {what}: {reason}")]
    Draw {
        /// Which chart.
        what: &'static str,
        /// Its words.
        reason: String,
    },
    /// The PNG could not be written.
    #[error("cannot write {path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Nothing to draw.
    #[error("nothing to draw: {0}")]
    Empty(&'static str),
}

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn font() {
    REGISTER.call_once(|| {
        // The embedded file is a valid TrueType font; a failure here would be a packaging bug
        // and only costs the text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn draw_error(what: &'static str) -> impl Fn(String) -> Error {
    move |reason| Error::Draw { what, reason }
}

fn save(path: &Path, width: u32, height: u32, rgb: Vec<u8>) -> Result<()> {
    let write = |reason: String| Error::Write {
        path: path.display().to_string(),
        reason,
    };
    let image = image::RgbImage::from_raw(width, height, rgb).ok_or_else(|| write("buffer size".into()))?;
    // Written beside the target and renamed, so a reader never sees half a PNG.
    let tmp = path.with_extension("png.partial");
    image
        .save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| write(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| write(e.to_string()))
}

/// One epoch on the curves.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPoint {
    /// `head` or `finetune`.
    pub phase: String,
    /// Mean training loss.
    pub train_loss: f64,
    /// Training accuracy.
    pub train_accuracy: f64,
    /// Mean validation loss, if validated.
    pub val_loss: Option<f64>,
    /// Validation accuracy, if validated.
    pub val_accuracy: Option<f64>,
}

/// Reads one value of an epoch.
type Metric = fn(&EpochPoint) -> Option<f64>;

/// Loss and accuracy per epoch, train and validation, side by side; a dashed line where
/// fine-tuning starts.
pub fn curves(epochs: &[EpochPoint], path: &Path) -> Result<()> {
    if epochs.is_empty() {
        return Err(Error::Empty("no epochs"));
    }
    font();
    let (width, height) = (1200u32, 480u32);
    let mut rgb = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        let panels = root.split_evenly((1, 2));
        let boundary = epochs
            .iter()
            .position(|e| e.phase == "finetune")
            .filter(|&i| i > 0);
        let n = epochs.len();
        let series = |f: fn(&EpochPoint) -> Option<f64>| -> Vec<(f64, f64)> {
            epochs
                .iter()
                .enumerate()
                .filter_map(|(i, e)| f(e).filter(|v| v.is_finite()).map(|v| ((i + 1) as f64, v)))
                .collect()
        };
        let charts: [(&str, Metric, Metric); 2] = [
            ("Loss", |e| Some(e.train_loss), |e| e.val_loss),
            ("Accuracy", |e| Some(e.train_accuracy), |e| e.val_accuracy),
        ];
        for (panel, (title, train, val)) in panels.iter().zip(charts) {
            let train = series(train);
            let val = series(val);
            let values = train.iter().chain(&val).map(|p| p.1);
            let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
            if !lo.is_finite() {
                (lo, hi) = (0.0, 1.0);
            }
            if title == "Accuracy" {
                // Accuracy always spans 0..1, so runs can be compared by eye.
                (lo, hi) = (0.0, 1.0);
            }
            let pad = ((hi - lo) * 0.05).max(1e-3);
            let x_max = (n as f64 + 0.5).max(1.5);
            let mut chart = ChartBuilder::on(panel)
                .caption(title, ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(56)
                .build_cartesian_2d(0.5..x_max, (lo - pad)..(hi + pad))
                .map_err(|e| draw_error("curves")(e.to_string()))?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                // Epochs are whole numbers: no labels between them.
                .x_label_formatter(&|x: &f64| {
                    if x.fract() == 0.0 {
                        format!("{x:.0}")
                    } else {
                        String::new()
                    }
                })
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(|e| draw_error("curves")(e.to_string()))?;
            for (points, name, colour) in [(train, "train", BLUE), (val, "validation", RED)] {
                if points.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))
                    .map_err(|e| draw_error("curves")(e.to_string()))?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                    });
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
                    .map_err(|e| draw_error("curves")(e.to_string()))?;
            }
            if let Some(b) = boundary {
                let x = b as f64 + 0.5;
                let dashes: Vec<(f64, f64)> = (0..40)
                    .map(|k| lo - pad + (hi - lo + 2.0 * pad) * k as f64 / 39.0)
                    .map(|y| (x, y))
                    .collect();
                chart
                    .draw_series(
                        dashes
                            .chunks(2)
                            .map(|seg| PathElement::new(seg.to_vec(), BLACK.mix(0.6).stroke_width(1))),
                    )
                    .map_err(|e| draw_error("curves")(e.to_string()))?;
                chart
                    .draw_series(std::iter::once(Text::new(
                        "fine-tune",
                        (x + 0.05, hi + pad * 0.2),
                        ("sans-serif", 14),
                    )))
                    .map_err(|e| draw_error("curves")(e.to_string()))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(|e| draw_error("curves")(e.to_string()))?;
        }
        root.present().map_err(|e| draw_error("curves")(e.to_string()))?;
    }
    save(path, width, height, rgb)
}

/// One test image with its classes.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Pixels, RGB, row-major.
    pub rgb: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The true class name.
    pub actual: String,
    /// The predicted class name.
    pub predicted: String,
}

/// Side of one upscaled image in the grid.
const CELL: u32 = 128;
/// Room for the title above each image.
const TITLE: u32 = 26;

/// Up to 25 images in a 5 x 5 grid, upscaled, each titled "Actual: x / Pred: y" (green when
/// right, red when wrong).
pub fn prediction_grid(predictions: &[Prediction], path: &Path) -> Result<()> {
    let (width, height, rgb) = draw_prediction_grid(predictions)?;
    save(path, width, height, rgb)
}

/// [`prediction_grid`] as PNG bytes, for a process that must not write files (a worker).
pub fn prediction_grid_png(predictions: &[Prediction]) -> Result<Vec<u8>> {
    let (width, height, rgb) = draw_prediction_grid(predictions)?;
    let image = image::RgbImage::from_raw(width, height, rgb).ok_or_else(|| Error::Draw {
        what: "predictions",
        reason: "buffer size".into(),
    })?;
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| Error::Draw {
            what: "predictions",
            reason: e.to_string(),
        })?;
    Ok(png.into_inner())
}

fn draw_prediction_grid(predictions: &[Prediction]) -> Result<(u32, u32, Vec<u8>)> {
    if predictions.is_empty() {
        return Err(Error::Empty("no predictions"));
    }
    font();
    let cols = 5u32;
    let shown = &predictions[..predictions.len().min(25)];
    let rows = (shown.len() as u32).div_ceil(cols);
    let cell_w = CELL + 64;
    let (width, height) = (cols * cell_w, rows * (CELL + TITLE + 8));
    let mut rgb = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        for (i, p) in shown.iter().enumerate() {
            let (col, row) = (i as u32 % cols, i as u32 / cols);
            let x0 = (col * cell_w + (cell_w - CELL) / 2) as i32;
            let y0 = (row * (CELL + TITLE + 8) + TITLE) as i32;
            if p.width == 0 || p.height == 0 || p.rgb.len() != (p.width * p.height * 3) as usize {
                return Err(Error::Draw {
                    what: "predictions",
                    reason: format!("image {i} has {} bytes for {}x{}", p.rgb.len(), p.width, p.height),
                });
            }
            // Nearest-neighbour upscaling keeps the small images' pixels visible.
            for y in 0..CELL {
                for x in 0..CELL {
                    let sx = x * p.width / CELL;
                    let sy = y * p.height / CELL;
                    let k = ((sy * p.width + sx) * 3) as usize;
                    let colour = RGBColor(p.rgb[k], p.rgb[k + 1], p.rgb[k + 2]);
                    root.draw_pixel((x0 + x as i32, y0 + y as i32), &colour)
                        .map_err(|e| draw_error("predictions")(e.to_string()))?;
                }
            }
            let colour = if p.actual == p.predicted {
                RGBColor(0, 120, 0)
            } else {
                RGBColor(200, 0, 0)
            };
            let title = format!("Actual: {} / Pred: {}", p.actual, p.predicted);
            let style = TextStyle::from(("sans-serif", 12).into_font()).color(&colour);
            root.draw_text(&title, &style, ((col * cell_w + 4) as i32, y0 - TITLE as i32 + 6))
                .map_err(|e| draw_error("predictions")(e.to_string()))?;
        }
        root.present()
            .map_err(|e| draw_error("predictions")(e.to_string()))?;
    }
    Ok((width, height, rgb))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(phase: &str, loss: f64, acc: f64) -> EpochPoint {
        EpochPoint {
            phase: phase.into(),
            train_loss: loss,
            train_accuracy: acc,
            val_loss: Some(loss * 1.1),
            val_accuracy: Some(acc * 0.9),
        }
    }

    #[test]
    fn curves_are_a_png_with_both_lines_and_the_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        let epochs = vec![
            point("head", 2.0, 0.3),
            point("head", 1.5, 0.5),
            point("finetune", 1.0, 0.7),
        ];
        curves(&epochs, &path).unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (1200, 480));
        let count = |pred: fn(&image::Rgb<u8>) -> bool| image.pixels().filter(|p| pred(p)).count();
        // Blue train lines, red validation lines, dark text and axes.
        assert!(count(|p| p[2] > 200 && p[0] < 60 && p[1] < 60) > 200);
        assert!(count(|p| p[0] > 200 && p[1] < 60 && p[2] < 60) > 200);
        assert!(count(|p| p[0] < 80 && p[1] < 80 && p[2] < 80) > 1000);
        assert!(!dir.path().join("curves.png.partial").exists());
    }

    #[test]
    fn prediction_grid_upscales_and_titles_each_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("predictions.png");
        let predictions: Vec<Prediction> = (0..7)
            .map(|i| Prediction {
                rgb: vec![(i * 30) as u8; 32 * 32 * 3],
                width: 32,
                height: 32,
                actual: "cat".into(),
                predicted: if i % 2 == 0 { "cat".into() } else { "dog".into() },
            })
            .collect();
        prediction_grid(&predictions, &path).unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        // 7 images: 5 columns, 2 rows.
        assert_eq!(image.dimensions(), (5 * 192, 2 * (128 + 26 + 8)));
        // The second image (value 30) fills a 128 x 128 square.
        let grey = image.pixels().filter(|p| p.0 == [30, 30, 30]).count();
        assert_eq!(grey, 128 * 128);
        // Green titles for right answers and red ones for wrong answers (anti-aliased).
        let green = image
            .pixels()
            .filter(|p| p[1] > p[0].saturating_add(40) && p[1] > p[2].saturating_add(40))
            .count();
        let red = image
            .pixels()
            .filter(|p| p[0] > p[1].saturating_add(60) && p[0] > p[2].saturating_add(60))
            .count();
        assert!(green > 100 && red > 100, "green {green}, red {red}");
    }

    #[test]
    fn empty_input_is_an_error() {
        let path = Path::new("/nonexistent/x.png");
        assert!(matches!(curves(&[], path), Err(Error::Empty(_))));
        assert!(matches!(prediction_grid(&[], path), Err(Error::Empty(_))));
    }
}
