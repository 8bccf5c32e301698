//! Indicator checks against independent computations, and the ops end to end.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::indicators::*;
use super::linalg::{eigenvalues, gram};
use super::net::{NetConfig, ParamSet, ProxyNet, SignRecorder};
use super::space::{Arch, OpSets};
use super::{CorrelateOp, SearchOp};
use crate::testing::OpRun;
use crate::{Input, Op};
use nn::layers::ForwardCtx;
use nn::{collect_params_mut, from_vec, Dev, ParamKind};

fn tiny() -> NetConfig {
    NetConfig {
        in_channels: 1,
        channels: 1,
        cells_per_stage: 1,
        stages: 1,
        classes: 2,
        stem: true,
    }
}

fn images(n: usize, c: usize, s: usize, seed: u64) -> Images {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Images {
        x: (0..n * c * s * s)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect(),
        shape: (n, c, s, s),
    }
}

/// Row i of the Jacobian of sum_k f_k(x_i) over every `.weight` scalar, by central differences.
fn fd_jacobian(net: &mut ProxyNet, x: &Images) -> Vec<Vec<f64>> {
    let dev = Dev::default();
    let xt = from_vec(&dev, x.x.clone(), x.shape).unwrap();
    let n = x.shape.0;
    let sums = |net: &mut ProxyNet| -> Vec<f64> {
        let y = net
            .forward(xt.clone(), &ForwardCtx::train(0), None)
            .unwrap()
            .as_vec();
        let k = y.len() / n;
        (0..n).map(|i| y[i * k..(i + 1) * k].iter().sum()).collect()
    };
    let h = 1e-6;
    let mut cols: Vec<Vec<f64>> = Vec::new();
    let count = collect_params_mut(net).len();
    for p in 0..count {
        let (name, kind, numel) = {
            let params = collect_params_mut(net);
            let (n, q) = &params[p];
            (n.clone(), q.kind, q.numel())
        };
        if kind != ParamKind::Trainable || !name.ends_with(".weight") {
            continue;
        }
        for e in 0..numel {
            let shifted = |d: f64, net: &mut ProxyNet| {
                let mut params = collect_params_mut(net);
                let q = &mut params[p].1;
                let mut v = q.to_vec();
                v[e] += d;
                q.set_vec(v).unwrap();
            };
            shifted(h, net);
            let up = sums(net);
            shifted(-2.0 * h, net);
            let down = sums(net);
            shifted(h, net);
            cols.push(
                up.iter()
                    .zip(&down)
                    .map(|(a, b)| (a - b) / (2.0 * h))
                    .collect(),
            );
        }
    }
    (0..n)
        .map(|i| cols.iter().map(|c| c[i]).collect())
        .collect()
}

#[test]
fn ntk_condition_number_matches_a_finite_difference_jacobian() {
    let cfg = tiny();
    let sets = Arch([3, 2, 1, 3, 4, 2]).op_sets();
    let x = images(3, 1, 4, 5);
    let dev = Dev::default();
    // The same weights the indicator draws for repeat 0 (seeded by the net's own derivation).
    let kappa = ntk_condition_number(&cfg, &sets, &x, 1, 42).unwrap();
    let seed0 = crate::seed::derive_seed(42, 7_000);
    let mut net = ProxyNet::new(&dev, &cfg, &sets, seed0).unwrap();
    let auto = net
        .per_sample_gradients(
            &from_vec(&dev, x.x.clone(), x.shape).unwrap(),
            ParamSet::Weights,
        )
        .unwrap();
    let fd = fd_jacobian(&mut net, &x);
    assert_eq!(auto[0].len(), fd[0].len());
    for (a, f) in auto.iter().flatten().zip(fd.iter().flatten()) {
        assert!((a - f).abs() < 1e-5 * (1.0 + f.abs()), "{a} vs {f}");
    }
    // Independent eigenvalues of the 3x3 Gram: the trigonometric closed form.
    let k = gram(&fd);
    let (a, b, c, d, e, f) = (k[0], k[4], k[8], k[1], k[5], k[2]);
    let q = (a + b + c) / 3.0;
    let p1 = d * d + e * e + f * f;
    let p2 = (a - q).powi(2) + (b - q).powi(2) + (c - q).powi(2) + 2.0 * p1;
    let p = (p2 / 6.0).sqrt();
    let bm = [
        (a - q) / p,
        d / p,
        f / p,
        d / p,
        (b - q) / p,
        e / p,
        f / p,
        e / p,
        (c - q) / p,
    ];
    let det = bm[0] * (bm[4] * bm[8] - bm[5] * bm[7]) - bm[1] * (bm[3] * bm[8] - bm[5] * bm[6])
        + bm[2] * (bm[3] * bm[7] - bm[4] * bm[6]);
    let phi = (det / 2.0).clamp(-1.0, 1.0).acos() / 3.0;
    let hi = q + 2.0 * p * phi.cos();
    let lo = q + 2.0 * p * (phi + 2.0 * std::f64::consts::PI / 3.0).cos();
    let want = hi / lo;
    assert!(
        (kappa - want).abs() < 1e-4 * want,
        "kappa {kappa} vs {want}"
    );
    let jac = eigenvalues(&k, 3);
    assert!((jac[2] / jac[0] - want).abs() < 1e-6 * want);
}

#[test]
fn linear_regions_of_a_one_dimensional_relu_layer_are_counted_by_hand() {
    // ReLU units w x - b on a grid over [-1, 3]: kinks at x = 0, 1, 2 (the unit -x + 2 has the
    // same kink as x - 2), so the line falls into 4 regions.
    let dev = Dev::default();
    let (w, b) = ([1.0, 1.0, -1.0, 1.0], [0.0, 1.0, -2.0, 2.0]);
    let grid: Vec<f64> = (0..401).map(|i| -1.0 + 0.01 * i as f64 + 0.005).collect();
    let pre: Vec<f64> = grid
        .iter()
        .flat_map(|x| w.iter().zip(&b).map(move |(w, b)| w * x - b))
        .collect();
    let t = from_vec(&dev, pre, (grid.len(), 4, 1, 1)).unwrap();
    let mut rec = SignRecorder::default();
    rec.push(&t);
    assert_eq!(count_regions(&rec.patterns(grid.len())), 4.0);
    // The thin network of an all-`none` cell maps everything to 0: one region.
    let crops = images(50, 1, 3, 2);
    let r = linear_regions(&thin_config(), &Arch([0; 6]).op_sets(), &crops, 2, 1).unwrap();
    assert_eq!(r, 1.0);
    let r = linear_regions(&thin_config(), &Arch([3; 6]).op_sets(), &crops, 2, 1).unwrap();
    assert!(r > 1.0 && r <= 50.0, "{r}");
}

#[test]
fn g_takes_cell_and_reduction_weights_but_no_biases() {
    let cfg = NetConfig {
        in_channels: 3,
        channels: 2,
        cells_per_stage: 1,
        stages: 3,
        classes: 3,
        stem: true,
    };
    let net = ProxyNet::new(
        &Dev::default(),
        &cfg,
        &Arch([3, 1, 1, 2, 1, 1]).op_sets(),
        0,
    )
    .unwrap();
    let names: Vec<String> = nn::collect_params(&net)
        .into_iter()
        .filter(|(n, p)| p.kind == ParamKind::Trainable && ParamSet::Cells.selects(n))
        .map(|(n, _)| n)
        .collect();
    assert!(
        names
            .iter()
            .any(|n| n.contains(".reduction.conv_a.conv.weight")),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n.contains(".reduction.shortcut.weight")),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n.contains(".cell.") && n.ends_with("bn.weight")),
        "{names:?}"
    );
    assert!(names.iter().all(|n| !n.ends_with(".bias")), "{names:?}");
    assert!(names
        .iter()
        .all(|n| !n.starts_with("stem") && !n.starts_with("classifier")));
}

#[test]
fn the_region_network_has_no_stem() {
    let net = ProxyNet::new(&Dev::default(), &thin_config(), &Arch([3; 6]).op_sets(), 0).unwrap();
    assert!(nn::collect_params(&net)
        .iter()
        .all(|(n, _)| !n.starts_with("stem")));
    let bad = NetConfig {
        in_channels: 3,
        ..thin_config()
    };
    assert!(ProxyNet::new(&Dev::default(), &bad, &Arch([3; 6]).op_sets(), 0).is_err());
}

#[test]
fn failed_architectures_fail_instead_of_scoring_zero() {
    let cfg = NetConfig {
        in_channels: 3,
        channels: 2,
        cells_per_stage: 1,
        stages: 3,
        classes: 3,
        stem: true,
    };
    let x = images(4, 3, 8, 1);
    let none = Arch([0; 6]).op_sets();
    assert!(matches!(
        ntk_condition_number(&cfg, &none, &x, 1, 0),
        Err(Failure::Singular { .. })
    ));
    // A conv-free cell has no weights of its own, but G also takes the reduction blocks'
    // (the reference's parameter set), so it is finite (it was a singular kernel when G took
    // only the cells' parameters).
    let skip = Arch([1; 6]).op_sets();
    let held = images(4, 3, 8, 3);
    let g = ntk_regression_error(&cfg, &skip, &x, &[0, 1, 2, 0], &held, &[1, 1, 2, 0], 1, 0);
    assert!(g.as_ref().is_ok_and(|g| g.is_finite() && *g > 0.0), "{g:?}");
    let pool = Arch([4, 4, 1, 4, 1, 4]).op_sets();
    let g = ntk_regression_error(&cfg, &pool, &x, &[0, 1, 2, 0], &held, &[1, 1, 2, 0], 1, 0);
    assert!(g.as_ref().is_ok_and(|g| g.is_finite()), "{g:?}");
    let good = Arch([3, 3, 1, 3, 2, 3]).op_sets();
    let k = ntk_condition_number(&cfg, &good, &x, 2, 0).unwrap();
    assert!(k.is_finite() && k >= 1.0);
    let g = ntk_regression_error(
        &cfg,
        &good,
        &x,
        &[0, 1, 2, 0],
        &images(4, 3, 8, 2),
        &[1, 1, 2, 0],
        1,
        0,
    )
    .unwrap();
    assert!(g.is_finite() && g > 0.0);
    let s = naswot(&cfg, &good, &x, 0).unwrap();
    assert!(s.is_finite());
    // Two skip edges into node 2 carry the same tensor (node 1 = x): once a dfdx panic on the
    // aliased gradient, now an ordinary cell with finite indicators.
    let aliased = Arch::parse("a", "1_11_042").unwrap().op_sets();
    let k = ntk_condition_number(&cfg, &aliased, &x, 1, 0).unwrap();
    assert!(k.is_finite() && k >= 1.0, "{k}");
    assert!(naswot(&cfg, &aliased, &x, 0).unwrap().is_finite());
    // Mixed supernets build and score too.
    assert!(ntk_condition_number(&cfg, &OpSets::full(), &x, 1, 0).is_ok());
}

/// Runs `search`; returns search.json's bytes, parsed, and the metrics.
fn search(params: Value, cpus: usize) -> (Vec<u8>, Value, crate::Metrics) {
    let output = OpRun::new(params).cpus(cpus).run(&SearchOp);
    let metrics = output.metrics().clone();
    let bytes = std::fs::read(output.out_dir.join(super::SEARCH_FILE)).unwrap();
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    (bytes, v, metrics)
}

const SMALL: &str =
    r#"{"channels": 1, "batch": 4, "repeats": 1, "region_samples": 40, "image_size": 8}"#;

#[test]
fn search_op_is_deterministic_across_thread_counts_and_feeds_correlate() {
    let proxy: Value = serde_json::from_str(SMALL).unwrap();
    let params = json!({"algorithm": "random", "samples": 6, "proxy": proxy});
    let (bytes_a, a, m) = search(params.clone(), 1);
    let (bytes_b, _, _) = search(params, 2);
    // The cached artifact is the same bytes whatever the thread count: no timings in it.
    assert!(bytes_a == bytes_b, "search.json differs between runs");
    assert!(a.get("seconds").is_none());
    for phase in ["prepare", "search", "total"] {
        assert!(m[&format!("seconds_{phase}")] >= 0.0, "{m:?}");
    }
    assert_eq!(m["num_scored"], 6.0);
    assert_eq!(a["data"]["source"], "gaussian");
    let traj = a["trajectory"].as_array().unwrap();
    for e in traj {
        if e["failed"].is_null() {
            assert!(e["values"]["ntk"].as_f64().unwrap() >= 1.0);
        } else {
            assert!(e["values"]["ntk"].is_null() || e["values"]["regions"].is_null());
        }
    }
    // Correlate against made-up trained runs for three of the cells.
    let root = tempfile::tempdir().unwrap();
    let sdir = root.path().join("search");
    std::fs::create_dir_all(&sdir).unwrap();
    std::fs::write(
        sdir.join(super::SEARCH_FILE),
        serde_json::to_vec(&a).unwrap(),
    )
    .unwrap();
    let mut items = Vec::new();
    for (i, e) in traj.iter().take(4).enumerate() {
        let label = format!("arch={},seed=0", e["arch"].as_str().unwrap());
        let dir: PathBuf = root.path().join(format!("run{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("history.json"),
            json!([{"val_accuracy": 0.1 * i as f64}]).to_string(),
        )
        .unwrap();
        items.push((label, dir));
    }
    let inputs = BTreeMap::from([
        ("search".to_string(), Input::One(sdir)),
        (
            "runs".to_string(),
            Input::Many {
                dir: root.path().to_path_buf(),
                items,
            },
        ),
    ]);
    let mut run = OpRun::new(json!({}));
    for (name, input) in inputs {
        run = run.input_as(&name, input);
    }
    let output = run.run(&CorrelateOp);
    assert_eq!(output.metrics()["num_archs"], 4.0);
    let c: Value =
        serde_json::from_slice(&std::fs::read(output.out_dir.join(super::CORRELATE_FILE)).unwrap())
            .unwrap();
    assert!(c["tau"]["ntk"].is_object());
}

#[test]
fn every_algorithm_writes_the_same_search_json_twice() {
    let proxy: Value = serde_json::from_str(SMALL).unwrap();
    for params in [
        json!({"algorithm": "prune", "proxy": proxy}),
        json!({"algorithm": "evolution", "population": 4, "tournament": 2, "cycles": 4, "proxy": proxy}),
        json!({"algorithm": "reinforce", "steps": 3, "indicators": ["ntk", "regions", "generalization", "naswot"], "proxy": proxy}),
        json!({"algorithm": "random", "samples": 4, "filter": "paper", "indicators": ["naswot"], "proxy": proxy}),
    ] {
        let (a, _, _) = search(params.clone(), 2);
        let (b, _, _) = search(params.clone(), 2);
        assert!(a == b, "{params}: search.json differs between two runs");
    }
}

#[test]
fn search_params_are_validated() {
    let plan = |params: Value| SearchOp.plan(&params);
    assert!(plan(json!({"algorithm": "random"})).is_ok());
    assert!(plan(json!({"algorithm": "annealing"}))
        .unwrap_err()
        .message
        .contains("unknown variant `annealing`"));
    assert!(plan(json!({})).unwrap_err().message.contains("`algorithm`"));
    assert!(plan(json!({"algorithm": "random", "bogus": 1}))
        .unwrap_err()
        .message
        .contains("bogus"));
    let vit = json!(["length_distortion", "ntk"]);
    for (params, path) in [
        (json!({"algorithm": "prune", "filter": "paper"}), "filter"),
        (
            json!({"algorithm": "random", "proxy": {"image_size": 6}}),
            "proxy.image_size",
        ),
        (
            json!({"algorithm": "random", "proxy": {"channels": 0}}),
            "proxy.channels",
        ),
        (json!({"algorithm": "random", "samples": 0}), "samples"),
        (
            json!({"algorithm": "random", "population": 0}),
            "population",
        ),
        (
            json!({"algorithm": "evolution", "tournament": 99}),
            "tournament",
        ),
        (
            json!({"algorithm": "reinforce", "momentum": 1.0}),
            "momentum",
        ),
        (
            json!({"algorithm": "random", "indicators": []}),
            "indicators",
        ),
        (
            json!({"algorithm": "random", "indicators": ["ntk", "ntk"]}),
            "indicators",
        ),
        (
            json!({"algorithm": "random", "indicators": ["length_distortion"]}),
            "indicators",
        ),
        (json!({"algorithm": "random", "space": "vit"}), "indicators"),
        (
            json!({"algorithm": "evolution", "space": "vit", "indicators": vit}),
            "algorithm",
        ),
        (
            json!({"algorithm": "random", "space": "vit", "indicators": vit, "filter": "paper"}),
            "filter",
        ),
        (
            json!({"algorithm": "random", "space": "vit", "indicators": vit, "vit": {"hidden": 12}}),
            "vit.hidden",
        ),
        (json!({"algorithm": "listed"}), "cells"),
        (
            json!({"algorithm": "listed", "cells": ["3_30_24"]}),
            "cells[0]",
        ),
        (
            json!({"algorithm": "listed", "cells": ["3_30_243"], "filter": "paper"}),
            "filter",
        ),
        (
            json!({"algorithm": "random", "cells": ["3_30_243"]}),
            "cells",
        ),
    ] {
        let e = plan(params.clone()).unwrap_err();
        assert_eq!(e.path, path, "{params}: {e:?}");
    }
    assert_eq!(
        plan(json!({"algorithm": "random", "samples": 0}))
            .unwrap_err()
            .message,
        "must be at least 1"
    );
    assert!(plan(json!({"algorithm": "listed", "cells": ["3_30_243", "1_11_042"]})).is_ok());
    // A matrix over algorithms gives every point every algorithm's settings.
    let all = json!({"samples": 8, "population": 4, "tournament": 2, "cycles": 2, "steps": 2, "batch": 1});
    for algorithm in ["random", "prune", "evolution", "reinforce"] {
        let mut params = all.clone();
        params["algorithm"] = json!(algorithm);
        assert!(plan(params).is_ok(), "{algorithm}");
    }
    let mut params = all;
    params["algorithm"] = json!("reinforce");
    params["space"] = json!("vit");
    params["indicators"] = vit;
    assert!(plan(params).is_ok());
}

#[test]
fn search_and_scale_document_every_param() {
    let rows = SearchOp.params_doc();
    let row = |path: &str| {
        rows.iter()
            .find(|r| r.path == path)
            .unwrap_or_else(|| panic!("no row {path} in {rows:#?}"))
    };
    assert_eq!(row("space").default, Some(json!("nb201")));
    assert!(row("algorithm").required);
    assert!(row("algorithm").kind.contains("\"evolution\""));
    assert_eq!(row("population").default, Some(json!(16)));
    assert_eq!(row("samples").kind, "integer >= 1");
    assert_eq!(row("proxy.batch").default, Some(json!(16)));
    for op in [&SearchOp as &dyn Op, &super::ScaleOp] {
        let rows = op.params_doc();
        assert!(rows.iter().all(|r| !r.doc.is_empty()), "{rows:#?}");
    }
}
