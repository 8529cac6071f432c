//! The optimizer a run asks for: Adam with the run's epsilon, and each phase's learning rate
//! at a given iteration.

use burn::optim::AdamConfig;
use run_config::RunConfig;

use effnet::phase::Phase;

/// Adam as `config` sets it (betas 0.9 and 0.999, as PyTorch and Keras).
pub fn adam(config: &RunConfig) -> AdamConfig {
    AdamConfig::new().with_epsilon(config.adam_epsilon as f32)
}

/// The learning rate of `phase` after `iteration` optimizer steps of that phase: phase 1's is
/// constant, phase 2's decays as Keras's legacy `decay` argument does,
/// `lr / (1 + decay * iteration)`.
pub fn learning_rate(config: &RunConfig, phase: Phase, iteration: u64) -> f64 {
    match phase {
        Phase::Head | Phase::Scratch => config.lr_head,
        Phase::FineTune => config.lr_finetune / (1.0 + config.lr_decay_finetune * iteration as f64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_two_decays_as_keras_does_and_phase_one_stays() {
        let config = RunConfig {
            lr_head: 1e-3,
            lr_finetune: 1e-6,
            lr_decay_finetune: 1e-3,
            ..RunConfig::default()
        };
        assert_eq!(learning_rate(&config, Phase::Head, 5_000), 1e-3);
        assert_eq!(learning_rate(&config, Phase::Scratch, 5_000), 1e-3);
        assert_eq!(learning_rate(&config, Phase::FineTune, 0), 1e-6);
        // Keras: lr * 1 / (1 + decay * iterations).
        assert!((learning_rate(&config, Phase::FineTune, 1_000) - 0.5e-6).abs() < 1e-18);
        let constant = RunConfig::default();
        assert_eq!(
            learning_rate(&constant, Phase::FineTune, 10_000),
            constant.lr_finetune
        );
    }
}
