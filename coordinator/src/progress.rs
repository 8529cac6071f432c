//! A progress bar over the run's units of work, for interactive terminals (logs otherwise).

use indicatif::{ProgressBar, ProgressStyle};

use crate::run::{Run, Stage, Unit};

/// The bar, or nothing when output is not interactive.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar on stderr when `enabled`.
    pub fn new(enabled: bool) -> Self {
        let bar = enabled.then(|| {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Self { bar }
    }

    /// Show where `run` is.
    pub fn update(&self, run: &Run) {
        if let Some(bar) = &self.bar {
            bar.set_length(run.plan.len() as u64);
            bar.set_position(run.current.min(run.plan.len()) as u64);
            bar.set_message(message(run));
        }
    }

    /// Leave the final state on screen.
    pub fn finish(&self, run: &Run) {
        if let Some(bar) = &self.bar {
            bar.finish_with_message(message(run));
        }
    }
}

/// One line: the stage, the unit in progress, the workers' step and the last epoch's numbers.
pub fn message(run: &Run) -> String {
    let mut parts = Vec::new();
    match (run.stage, run.plan.get(run.current)) {
        (Stage::Waiting, _) => parts.push(format!(
            "waiting for workers {}/{}",
            run.workers.len(),
            run.expected
        )),
        (Stage::Head | Stage::Finetune, Some(Unit::Epoch { epoch, .. })) => {
            let of_phase = run
                .plan
                .iter()
                .filter(|u| matches!(u, Unit::Epoch { phase, .. } if phase.label() == run.stage.label()))
                .count();
            let step = run.workers.values().map(|w| w.step).max().unwrap_or(0);
            parts.push(format!(
                "{} epoch {}/{of_phase}, step {step}",
                run.stage.label(),
                epoch + 1
            ));
        }
        (stage, _) => parts.push(stage.label().to_string()),
    }
    if let Some(last) = run.history.last() {
        let mut numbers = format!(
            "last: loss {:.3} acc {:.1}%",
            last.train_loss,
            last.train_accuracy * 100.0
        );
        if let Some(val) = last.val_accuracy {
            numbers.push_str(&format!(" val {:.1}%", val * 100.0));
        }
        parts.push(numbers);
    }
    parts.join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use run_config::RunConfig;

    #[test]
    fn message_names_the_stage_and_epoch() {
        let config = RunConfig {
            head_epochs: 2,
            finetune_epochs: 3,
            ..RunConfig::default()
        };
        let mut run = Run::new("r".into(), config, 2);
        assert_eq!(message(&run), "waiting for workers 0/2");
        run.stage = Stage::Finetune;
        run.current = 3;
        assert_eq!(message(&run), "finetune epoch 2/3, step 0");
    }
}
