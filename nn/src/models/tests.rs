use super::*;
use crate::gradcheck::{check_param_grads, rand_tensor};
use crate::{collect_params, Init, InitScheme};
use serde_json::json;

fn build(
    spec: serde_json::Value,
    input: (usize, usize, usize),
    seed: u64,
) -> Result<Model<f64>, NnError> {
    let spec = ModelSpec::from_json(spec)?;
    let input = InputShape {
        channels: input.0,
        height: input.1,
        width: input.2,
    };
    let (dev, init) = (Dev::default(), Init::default());
    Model::build(&spec, input, VarBuilder::new(&dev, &init, seed))
}

fn out_shape(m: &mut Model<f64>, b: usize, seed: u64) -> (usize, usize) {
    let i = m.input_shape();
    let x = rand_tensor(&Dev::default(), (b, i.channels, i.height, i.width), seed);
    *m.forward(x, &mut ForwardCtx::train(0)).unwrap().shape()
}

#[test]
fn mlp_dag_shapes_names_and_gradients() {
    let mut m = build(
        json!({"kind": "mlp_dag", "topology": "2_12_002", "width": 5, "classes": 3}),
        (1, 2, 3),
        0,
    )
    .unwrap();
    assert_eq!(out_shape(&mut m, 4, 1), (4, 3));
    let names: Vec<String> = collect_params(&m).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "stem.weight",
            "stem.bias",
            "edges.0.weight",
            "edges.0.bias",
            "edges.2.weight",
            "edges.2.bias",
            "edges.5.weight",
            "edges.5.bias",
            "readout.weight",
            "readout.bias"
        ]
    );
    let x = rand_tensor(&Dev::default(), (3, 1, 2, 3), 2);
    let mut ctx = ForwardCtx::train(0);
    check_param_grads(&mut m, &x, |m, t| m.forward(t, &mut ctx), 6, 1e-5);
}

#[test]
fn cnn_dag_shapes_and_gradients() {
    let mut m = build(
        json!({"kind": "cnn_dag", "topology": "2_12", "width": 3, "kernel": 3, "classes": 4}),
        (2, 5, 5),
        0,
    )
    .unwrap();
    assert_eq!(out_shape(&mut m, 2, 1), (2, 4));
    let x = rand_tensor(&Dev::default(), (2, 2, 4, 4), 3);
    let mut m = build(
        json!({"kind": "cnn_dag", "topology": "2_12", "width": 3, "classes": 4}),
        (2, 4, 4),
        0,
    )
    .unwrap();
    let mut ctx = ForwardCtx::train(0);
    check_param_grads(&mut m, &x, |m, t| m.forward(t, &mut ctx), 4, 1e-5);
}

#[test]
fn nb201_shapes_names_and_gradients() {
    let arch =
        "|nor_conv_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|skip_connect~0|none~1|nor_conv_3x3~2|";
    let mut m = build(
        json!({"kind": "nb201", "cell": arch, "channels": 2, "cells_per_stage": 1, "classes": 5}),
        (3, 8, 8),
        0,
    )
    .unwrap();
    assert_eq!(out_shape(&mut m, 2, 1), (2, 5));
    let names: Vec<String> = collect_params(&m).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"blocks.0.edges.0.conv.weight".to_string()));
    assert!(names.contains(&"blocks.1.shortcut.weight".to_string()));
    assert!(names.contains(&"blocks.4.edges.5.bn.running_var".to_string()));
    assert!(names.contains(&"classifier.weight".to_string()));
    // Sizes the two reduction branches would disagree on are refused up front.
    let odd = build(
        json!({"kind": "nb201", "cell": "3_33_333", "channels": 2, "cells_per_stage": 1, "classes": 2}),
        (1, 6, 6),
        0,
    );
    assert!(odd.unwrap_err().to_string().contains("divisible by 4"));
    let x = rand_tensor(&Dev::default(), (2, 3, 8, 8), 4);
    let mut ctx = ForwardCtx::train(0);
    check_param_grads(&mut m, &x, |m, t| m.forward(t, &mut ctx), 2, 1e-5);
}

#[test]
fn an_all_none_cell_outputs_a_constant() {
    // No path through the cell: NB-201 keeps such networks (they score chance accuracy).
    let mut m = build(json!({"kind": "nb201", "cell": "0_00_000", "channels": 2, "cells_per_stage": 1, "classes": 3}), (1, 4, 4), 0).unwrap();
    let dev = Dev::default();
    let a = m
        .forward(rand_tensor(&dev, (2, 1, 4, 4), 1), &mut ForwardCtx::eval())
        .unwrap()
        .as_vec();
    let b = m
        .forward(rand_tensor(&dev, (2, 1, 4, 4), 2), &mut ForwardCtx::eval())
        .unwrap()
        .as_vec();
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() < 1e-12);
    }
}

#[test]
fn specs_are_validated_with_field_names() {
    let err = |v| build(v, (1, 4, 4), 0).unwrap_err().to_string();
    let e = err(
        json!({"kind": "mlp_dag", "topology": "2_02_002", "width": 4, "classes": 2, "depth": 3}),
    );
    assert!(e.contains("depth"), "{e}");
    let e = err(json!({"kind": "transformer"}));
    assert!(e.contains("transformer"), "{e}");
    let e = err(json!({"kind": "mlp_dag", "topology": "2_00_000", "width": 4, "classes": 2}));
    assert!(e.contains("no input-to-output path"), "{e}");
    let e = err(json!({"kind": "cnn_dag", "topology": "2", "width": 4, "kernel": 2, "classes": 2}));
    assert!(e.contains("odd"), "{e}");
    let e = err(json!({"kind": "nb201", "cell": "9_99_999", "classes": 2}));
    assert!(e.contains("model.cell"), "{e}");
    let e = err(json!({"kind": "mlp_dag", "topology": "2", "width": 0, "classes": 2}));
    assert!(e.contains("model.width"), "{e}");
}

#[test]
fn same_seed_gives_identical_weights() {
    let spec = json!({"kind": "nb201", "cell": "3_33_133", "channels": 2, "cells_per_stage": 1, "classes": 3});
    let a = build(spec.clone(), (3, 8, 8), 7).unwrap();
    let b = build(spec.clone(), (3, 8, 8), 7).unwrap();
    let c = build(spec, (3, 8, 8), 8).unwrap();
    let flat = |m: &Model<f64>| -> Vec<u64> {
        collect_params(m)
            .into_iter()
            .flat_map(|(_, p)| p.to_vec())
            .map(f64::to_bits)
            .collect()
    };
    assert_eq!(flat(&a), flat(&b));
    assert_ne!(flat(&a), flat(&c));
    let init = Init::new(InitScheme::KaimingNormal);
    let spec =
        ModelSpec::from_json(json!({"kind": "mlp_dag", "topology": "2", "width": 3, "classes": 2}))
            .unwrap();
    let input = InputShape {
        channels: 1,
        height: 1,
        width: 4,
    };
    let dev = Dev::default();
    let k = Model::<f64>::build(&spec, input, VarBuilder::new(&dev, &init, 7)).unwrap();
    assert!(collect_params(&k)
        .iter()
        .filter(|(n, _)| n.ends_with("bias"))
        .all(|(_, p)| p.to_vec().iter().all(|v| *v == 0.0)));
}

#[test]
fn fno2d_shapes_names_and_gradients() {
    let spec = json!({"kind": "fno2d", "width": 3, "modes": [2, 2], "layers": 2, "head_width": 4});
    let mut m = build(spec, (2, 6, 5), 0).unwrap();
    assert_eq!(out_shape(&mut m, 2, 1), (2, 30));
    assert_eq!(m.output_shape(), [1, 6, 5]);
    let names: Vec<String> = collect_params(&m).into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"layers.1.spectral.weight_im".to_string()));
    assert!(names.contains(&"head.fc2.bias".to_string()));
    let x = rand_tensor(&Dev::default(), (2, 2, 4, 4), 5);
    let mut small = build(
        json!({"kind": "fno2d", "width": 2, "modes": [1, 2], "layers": 2, "head_width": 3}),
        (2, 4, 4),
        1,
    )
    .unwrap();
    let mut ctx = ForwardCtx::train(0);
    check_param_grads(&mut small, &x, |m, t| m.forward(t, &mut ctx), 4, 1e-5);
    let e = build(
        json!({"kind": "fno2d", "width": 3, "modes": [4, 2], "layers": 1}),
        (1, 6, 6),
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("model.modes"), "{e}");
}

#[test]
fn fno2d_mae_reconstructs_input_channels_and_names_its_encoder() {
    let spec =
        json!({"kind": "fno2d_mae", "width": 3, "modes": [2, 2], "layers": 1, "head_width": 4});
    let mut m = build(spec, (3, 4, 4), 0).unwrap();
    assert_eq!(out_shape(&mut m, 2, 1), (2, 48));
    let names: Vec<String> = collect_params(&m).into_iter().map(|(n, _)| n).collect();
    for want in [
        "encoder.lift.weight",
        "encoder.layers.0.spectral.weight_re",
        "bridge.weight",
        "decoder.layers.0.pointwise.bias",
        "decoder.head.fc2.weight",
    ] {
        assert!(
            names.contains(&want.to_string()),
            "{want} missing from {names:?}"
        );
    }
}

/// Cells whose node receives the same tensor twice through skip edges once panicked in dfdx
/// (it cannot add a tensor to itself); their gradients must also be right.
#[test]
fn repeated_skip_edges_into_one_node_have_correct_gradients() {
    for (spec, input) in [
        (
            json!({"kind": "mlp_dag", "topology": "1_11", "width": 3, "classes": 2}),
            (1, 2, 2),
        ),
        (
            json!({"kind": "nb201", "cell": "1_11_042", "channels": 2, "cells_per_stage": 1, "classes": 2}),
            (1, 4, 4),
        ),
    ] {
        let mut m = build(spec, input, 0).unwrap();
        let x = rand_tensor(&Dev::default(), (2, input.0, input.1, input.2), 3);
        let mut ctx = ForwardCtx::train(0);
        check_param_grads(&mut m, &x, |m, t| m.forward(t, &mut ctx), 6, 1e-5);
    }
}
