//! End-to-end checks of the training library on tiny synthetic tasks.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::*;
use crate::layers::ForwardCtx;
use crate::models::InputShape;
use crate::tensor::from_vec;
use crate::{
    collect_params, CheckpointError, Dev, Float, Init, Model, ModelSpec, NnError, Tensor4,
    VarBuilder,
};

/// 1 x 4 x 4 images: noise plus one bright pixel, in the top half for class 0 and the bottom
/// half for class 1. A model must look at where the pixel is.
fn blobs(n: usize, seed: u64) -> (Tensor4<f32>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut x = vec![0f32; n * 16];
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let class = rng.gen_range(0..2);
        for v in &mut x[i * 16..(i + 1) * 16] {
            *v = rng.gen_range(-0.1..0.1);
        }
        let row = rng.gen_range(0..2) + 2 * class;
        x[i * 16 + row * 4 + rng.gen_range(0..4)] += 1.0;
        y.push(class);
    }
    (from_vec(&Dev::default(), x, (n, 1, 4, 4)).unwrap(), y)
}

fn model(spec: serde_json::Value, seed: u64) -> Model<f32> {
    let spec = ModelSpec::from_json(spec).unwrap();
    let input = InputShape {
        channels: 1,
        height: 4,
        width: 4,
    };
    let (dev, init) = (Dev::default(), Init::default());
    Model::build(&spec, input, VarBuilder::new(&dev, &init, seed)).unwrap()
}

/// Trains on `blobs` with `batch` samples per step; returns the last step's loss.
fn train(
    m: &mut Model<f32>,
    opt: OptimizerSpec,
    lr: f64,
    steps: u64,
    seed: u64,
) -> Result<f64, NnError> {
    let mut opt = Optimizer::new(opt, vec![])?;
    let sched: Schedule =
        serde_json::from_value(json!({"kind": "cosine", "warmup_steps": 5})).unwrap();
    let mut ctx = ForwardCtx::train(seed);
    let mut last = f64::NAN;
    for step in 0..steps {
        let (x, y) = blobs(32, seed * 1000 + step);
        let lr = sched.lr_at(lr, step, steps);
        last = train_step(
            m,
            &mut opt,
            x,
            &Target::Labels(y),
            LossKind::CrossEntropy,
            lr,
            Some(5.0),
            &mut ctx,
            step,
        )?
        .loss;
    }
    Ok(last)
}

#[test]
fn mlp_dag_learns_the_blob_task() {
    let mut m = model(
        json!({"kind": "mlp_dag", "topology": "2_12", "width": 16, "classes": 2}),
        1,
    );
    let sgd = OptimizerSpec::Sgd {
        momentum: 0.9,
        nesterov: true,
        weight_decay: 0.0,
    };
    let (x, y) = blobs(200, 999);
    let before = evaluate(
        &mut m,
        &x,
        &Target::Labels(y.clone()),
        LossKind::CrossEntropy,
        64,
    )
    .unwrap();
    train(&mut m, sgd, 0.1, 80, 1).unwrap();
    let after = evaluate(&mut m, &x, &Target::Labels(y), LossKind::CrossEntropy, 64).unwrap();
    assert!(
        after.loss < 0.15,
        "held-out loss {} (before training {})",
        after.loss,
        before.loss
    );
    assert!(
        after.accuracy.unwrap() > 0.95,
        "accuracy {:?}",
        after.accuracy
    );
}

#[test]
fn cnn_dag_learns_the_blob_task_with_adamw() {
    let mut m = model(
        json!({"kind": "cnn_dag", "topology": "2_12", "width": 4, "classes": 2}),
        2,
    );
    let adamw = OptimizerSpec::Adamw {
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.0,
    };
    train(&mut m, adamw, 0.03, 60, 2).unwrap();
    let (x, y) = blobs(200, 998);
    let after = evaluate(&mut m, &x, &Target::Labels(y), LossKind::CrossEntropy, 64).unwrap();
    assert!(after.loss < 0.3, "held-out loss {}", after.loss);
    assert!(
        after.accuracy.unwrap() > 0.9,
        "accuracy {:?}",
        after.accuracy
    );
}

#[test]
fn a_huge_learning_rate_is_reported_as_divergence() {
    let mut m = model(
        json!({"kind": "mlp_dag", "topology": "2_22", "width": 8, "classes": 2}),
        3,
    );
    let sgd = OptimizerSpec::Sgd {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    };
    let mut opt = Optimizer::new(sgd, vec![]).unwrap();
    let mut ctx = ForwardCtx::train(0);
    let mut outcome = Ok(());
    for step in 0..50 {
        // Regression onto the labels: the readout bias alone then grows by |1 - 2 lr| per step.
        let (x, y) = blobs(16, step);
        let t = from_vec(
            &Dev::default(),
            y.iter().flat_map(|&c| [c as f32, 1.0 - c as f32]).collect(),
            (16, 2),
        )
        .unwrap();
        if let Err(e) = train_step(
            &mut m,
            &mut opt,
            x,
            &Target::Values(t),
            LossKind::Mse,
            1e8,
            None,
            &mut ctx,
            step,
        ) {
            outcome = Err(e);
            break;
        }
    }
    assert!(
        matches!(outcome, Err(NnError::NonFiniteLoss { .. })),
        "{outcome:?}"
    );
}

#[test]
fn same_seed_training_is_bit_identical() {
    let run = || {
        let mut m = model(
            json!({"kind": "cnn_dag", "topology": "2", "width": 3, "classes": 2}),
            5,
        );
        let sgd = OptimizerSpec::Sgd {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 5e-4,
        };
        train(&mut m, sgd, 0.05, 5, 5).unwrap();
        collect_params(&m)
            .into_iter()
            .flat_map(|(_, p)| p.to_vec())
            .map(f32::to_bits)
            .collect::<Vec<u32>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn checkpoints_round_trip_weights_buffers_and_spec() {
    let spec = json!({"kind": "nb201", "cell": "3_14_203", "channels": 2, "cells_per_stage": 1, "classes": 2});
    let mut m = model(spec, 6);
    let sgd = OptimizerSpec::Sgd {
        momentum: 0.0,
        nesterov: false,
        weight_decay: 0.0,
    };
    train(&mut m, sgd, 0.05, 2, 6).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_checkpoint(&m, dir.path()).unwrap();
    let mut back: Model<f32> = load_checkpoint(&Dev::default(), dir.path()).unwrap();
    assert_eq!(back.spec(), m.spec());
    let a = collect_params(&m);
    let b = collect_params(&back);
    assert_eq!(a.len(), b.len());
    for ((na, pa), (nb, pb)) in a.iter().zip(&b) {
        assert_eq!((na, &pa.shape, pa.to_vec()), (nb, &pb.shape, pb.to_vec()));
    }
    let (x, _) = blobs(4, 7);
    assert_eq!(
        predict(&mut m, x.clone()).unwrap().as_vec(),
        predict(&mut back, x).unwrap().as_vec()
    );

    // Renaming loads a subset into another model; unknown targets are errors.
    let mut other = model(
        json!({"kind": "nb201", "cell": "3_14_203", "channels": 2, "cells_per_stage": 1, "classes": 2}),
        9,
    );
    let path = dir.path().join(WEIGHTS_FILE);
    let got = load_weights(&mut other, &path, |n| {
        n.starts_with("stem").then(|| n.to_string())
    })
    .unwrap();
    assert_eq!(
        got,
        [
            "stem.weight",
            "stem_bn.bias",
            "stem_bn.running_mean",
            "stem_bn.running_var",
            "stem_bn.weight"
        ]
    );
    assert!(load_weights(&mut other, &path, |n| Some(format!("x.{n}"))).is_err());
    assert!(load_checkpoint::<f32>(&Dev::default(), &dir.path().join("missing")).is_err());
}

#[test]
fn checkpoint_errors_say_which_file_and_what_is_wrong() {
    let spec = json!({"kind": "mlp_dag", "topology": "2", "width": 3, "classes": 2});
    let m = model(spec.clone(), 1);
    let dir = tempfile::tempdir().unwrap();
    save_checkpoint(&m, dir.path()).unwrap();
    let weights = dir.path().join(WEIGHTS_FILE);
    let mut other = model(spec, 2);

    let e = load_weights(&mut other, &weights, |n| Some(format!("x.{n}"))).unwrap_err();
    assert!(
        matches!(&e, NnError::Checkpoint { path, source: CheckpointError::UnknownTensor { target, .. } }
            if *path == weights && target.starts_with("x.")),
        "{e:?}"
    );
    let wide = json!({"kind": "mlp_dag", "topology": "2", "width": 4, "classes": 2});
    let e = load_weights(&mut model(wide, 3), &weights, |n| Some(n.to_string())).unwrap_err();
    assert!(
        matches!(&e, NnError::Checkpoint { source: CheckpointError::ShapeMismatch { file, model, .. }, .. }
            if file[0] == 3 && model[0] == 4),
        "{e:?}"
    );

    let missing = dir.path().join("missing");
    match load_checkpoint::<f32>(&Dev::default(), &missing) {
        Err(NnError::Checkpoint {
            path,
            source: CheckpointError::Io(io),
        }) => {
            assert_eq!(path, missing.join(SPEC_FILE));
            assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }

    // A weights file holding one of the model's tensors.
    let (name, p) = &collect_params(&m)[0];
    let data = f32::encode_le(&p.to_vec());
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, p.shape.clone(), &data)
            .unwrap();
    std::fs::write(
        &weights,
        safetensors::serialize([(name.clone(), view)], &None).unwrap(),
    )
    .unwrap();
    let expected = collect_params(&m).len();
    assert!(matches!(
        load_checkpoint::<f32>(&Dev::default(), dir.path()),
        Err(NnError::Checkpoint { source: CheckpointError::MissingTensors { loaded: 1, expected: e }, .. })
            if e == expected
    ));

    std::fs::write(dir.path().join(SPEC_FILE), "{").unwrap();
    assert!(matches!(
        load_checkpoint::<f32>(&Dev::default(), dir.path()),
        Err(NnError::Checkpoint {
            source: CheckpointError::Json(_),
            ..
        })
    ));
}
