//! Training: the optimiser over named parameters, learning-rate schedules, losses, metrics, one
//! training step with non-finite-loss detection, and checkpoints.

mod checkpoint;
mod loss;
mod optim;
mod schedule;
mod step;

pub use checkpoint::{
    load_checkpoint, load_weights, save_checkpoint, CheckpointMeta, SPEC_FILE, WEIGHTS_FILE,
};
pub use loss::{accuracy, cross_entropy, loss, mse, relative_l2, sum_of_squares, LossKind, Target};
pub use optim::{clip_grad_norm, Optimizer, OptimizerSpec, ParamGroup};
pub use schedule::{Schedule, ScheduleKind};
pub use step::{evaluate, predict, train_step, EvalReport, StepReport};

#[cfg(test)]
mod tests;
