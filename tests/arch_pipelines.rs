//! Smoke-size runs of the architecture pipelines (`pipelines/arch_aware_lr.yaml`,
//! `nb201_rerank.yaml`, `connectivity.yaml`, `teg_nas.yaml`) through the real `engine` binary:
//! the real files, shrunk with `--set` (the shipped digits swapped for small synthetic images), each in its own cache folder (except where a test checks
//! that two pipelines share one); values are checked, not just exit codes.

#[path = "common/paper.rs"]
mod paper;

use paper::{metric, output_json, pipeline, report, run, stage, stages};

#[test]
fn arch_aware_lr_predicts_chain_lrs_by_the_formula_and_correlates() {
    let ws = tempfile::tempdir().unwrap();
    let cache = ws.path().join("cache");
    let p = pipeline("arch_aware_lr.yaml");
    let sets = [
        "stages.data.op=data.synthetic_images",
        "stages.data.samples=300",
        "vars.width=8",
        "vars.cnn_width=2",
        "vars.seeds=[0]",
        "vars.lr_grid=[0.05, 0.4, 3.2]",
        "vars.chains=[\"2_02_002\", \"2_02_002_0002_00002\"]",
        "vars.mlp_topologies=[\"2_02_002\", \"2_21_112\"]",
        "vars.cnn_topologies=[\"2_02_002\"]",
        "vars.kernels=[3, 7]",
    ];
    let r = run(&p, &cache, &sets);
    // 3 grid points for each of 2 bases, 2 chains, 2 topologies and 2 CNN cells.
    assert_eq!(stages(&r, "probe_mlp_depth").len(), 6);
    assert_eq!(stages(&r, "probe_cnn").len(), 6);
    let base = metric(&r, "pick_base_mlp", "lr_star");
    assert!([0.05, 0.4, 3.2].contains(&base), "{base}");
    // A chain of depth d: one path with L = d + 3; base "1": L = 3. eta* = eta_base sqrt(27 / L^3).
    for (topology, d) in [("2_02_002", 3.0f64), ("2_02_002_0002_00002", 5.0)] {
        let name = format!("pick_mlp_depth[topology={topology}]");
        let want = base * (27.0 / (d + 3.0).powi(3)).sqrt();
        let got = metric(&r, &name, "lr_predicted");
        assert!((got - want).abs() < 1e-12 * want, "{name}: {got} vs {want}");
        let probed = metric(&r, &name, "lr_star");
        assert!([0.05, 0.4, 3.2].contains(&probed), "{probed}");
    }
    // CNN k = 7 against k = 3: the same cell predicts 3/7 of the LR.
    let k3 = metric(&r, "pick_cnn[topology=2_02_002,kernel=3]", "lr_predicted");
    let k7 = metric(&r, "pick_cnn[topology=2_02_002,kernel=7]", "lr_predicted");
    assert!((k7 / k3 - 3.0 / 7.0).abs() < 1e-12, "{k3} {k7}");
    // Pearson r, where defined (two points whose probed LRs differ), is within [-1, 1].
    let mut all_defined = true;
    for family in ["mlp_depth", "mlp_topology", "cnn"] {
        let m = &stage(&r, &format!("correlation[family={family}]"))["metrics"];
        assert_eq!(m["n"], 2.0, "{m}");
        match m["pearson_r"].as_f64() {
            Some(v) => assert!((-1.0 - 1e-12..=1.0 + 1e-12).contains(&v), "{m}"),
            None => all_defined = false,
        }
    }
    let out = ws.path().join("report");
    let md = report(&p, &cache, &out, &sets).expect("the report");
    assert!(md.contains("pearson_r") && md.contains("0.962"), "{md}");
    assert!(out.join("depth_predicted_vs_probed.svg").exists());
    // With 2 points per family a probed LR can be constant: r is then undefined, not made up,
    // and the report says so instead of printing a number.
    if !all_defined {
        assert!(md.contains('–') && md.contains("undefined"), "{md}");
    }
}

#[test]
fn nb201_rerank_runs_both_recipes_and_trains_only_added_cells() {
    let ws = tempfile::tempdir().unwrap();
    let cache = ws.path().join("cache");
    let p = pipeline("nb201_rerank.yaml");
    let small = [
        "stages.data.op=data.synthetic_images",
        "stages.data.samples=240",
        "vars.channels=2",
        "vars.epochs=1",
        "vars.seeds=[0, 1]",
        "vars.top_k_table=[100]",
    ];
    let three = "vars.archs=[\"3_30_243\", \"3_23_241\", \"4_12_104\"]";
    let mut sets: Vec<&str> = small.to_vec();
    sets.push(three);
    let r = run(&p, &cache, &sets);
    assert_eq!(stages(&r, "train_benchmark").len(), 6);
    assert_eq!(stages(&r, "train_arch_aware").len(), 6);
    // "3_30_243": paths 0-3 (conv1x1), 0-1-3 (conv3x3, pool), 0-2-3 (conv3x3, conv3x3):
    // d = 1, 1, 2 -> L = 2, 2, 3 -> sum L^3 = 43; base "0_00_100": L = [1].
    let lr = metric(&r, "train_arch_aware[arch=3_30_243,seed=0]", "lr");
    assert!((lr - 0.46 / 43f64.sqrt()).abs() < 1e-12, "{lr}");
    assert_eq!(
        metric(&r, "train_benchmark[arch=3_30_243,seed=0]", "lr"),
        0.1
    );
    let tau = metric(&r, "rerank", "tau_all");
    assert!((-1.0..=1.0).contains(&tau), "{tau}");
    assert_eq!(metric(&r, "rerank", "num_archs"), 3.0);
    let md = report(&p, &cache, &ws.path().join("report"), &sets).unwrap();
    assert!(
        md.contains("tau_vs_top_k") && md.contains("0.85-0.9"),
        "{md}"
    );

    // One more cell: only its 2 x 2 train stages run.
    let four = "vars.archs=[\"3_30_243\", \"3_23_241\", \"4_12_104\", \"2_44_120\"]";
    let mut sets: Vec<&str> = small.to_vec();
    sets.push(four);
    let r = run(&p, &cache, &sets);
    let ran: Vec<&str> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "ran" && s["op"] == "train")
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(ran.len(), 4, "{ran:?}");
    assert!(ran.iter().all(|n| n.contains("arch=2_44_120")), "{ran:?}");
    assert_eq!(stage(&r, "data")["status"], "cached");
    assert_eq!(metric(&r, "rerank", "num_archs"), 4.0);
}

#[test]
fn connectivity_orders_the_bounds_and_filters_the_nb201_space() {
    let ws = tempfile::tempdir().unwrap();
    let cache = ws.path().join("cache");
    let p = pipeline("connectivity.yaml");
    let sets = [
        "stages.data.op=data.synthetic_images",
        "stages.data.samples=200",
        "vars.width=8",
        "vars.epochs=2",
        "vars.epoch_points=[1, 2]",
        "vars.seeds=[0]",
        "stages.nas_data.op=data.synthetic_images",
        "stages.nas_data.samples=240",
        "vars.nas_channels=2",
        "vars.nas_epochs=1",
        "vars.nas_draws=24",
        "vars.nas_seeds=[0]",
        "vars.nas_proxy={channels: 1, batch: 4}",
    ];
    let r = run(&p, &cache, &sets);
    let bound = |cell: &str| metric(&r, &format!("nngp[cell={cell}]"), "lambda_min_bound");
    // connectivity-convergence.md §1: chain < parallel < mixed.
    let (chain, parallel, mixed) = (bound("2_02_002"), bound("1_10_222"), bound("2_21_112"));
    assert!(
        chain < parallel && parallel < mixed,
        "{chain} {parallel} {mixed}"
    );
    for b in ["space", "paper_nb201", "reference_nb201"] {
        let name = format!("nas_filter[box={b}]");
        assert_eq!(metric(&r, &name, "space_size"), 15625.0);
        let f = metric(&r, &name, "fraction_kept");
        assert!(f > 0.0 && f < 1.0, "{name}: {f}");
    }
    // NASWOT random search over the same 24 draws: the filtered run scores only the accepted.
    let (none, space) = ("naswot_search[filter=none]", "naswot_search[filter=space]");
    assert_eq!(metric(&r, none, "num_scored"), 24.0);
    assert_eq!(metric(&r, none, "num_rejected"), 0.0);
    assert_eq!(metric(&r, none, "filter_fraction_kept"), 1.0);
    let scored = metric(&r, space, "num_scored");
    assert_eq!(scored + metric(&r, space, "num_rejected"), 24.0);
    assert!(scored > 0.0 && scored < 24.0, "{scored}");
    let kept = metric(&r, space, "filter_fraction_kept");
    assert_eq!(kept, metric(&r, "nas_filter[box=space]", "fraction_kept"));
    let draws = output_json(&r, space, "search.json");
    for e in draws["trajectory"].as_array().unwrap() {
        assert!(
            e["values"]["naswot"].is_number() || e["failed"].is_string(),
            "{e}"
        );
    }
    // Each pick is trained: its model is the cell its search chose.
    for f in ["none", "space"] {
        let chose = output_json(&r, &format!("naswot_search[filter={f}]"), "search.json");
        let model = output_json(
            &r,
            &format!("train_nas_pick[filter={f},seed=0]"),
            "model.json",
        );
        let cell = chose["choice"]["digits"].as_str().unwrap();
        assert!(model.to_string().contains(cell), "{model} vs {cell}");
        let acc = metric(
            &r,
            &format!("train_nas_pick[filter={f},seed=0]"),
            "test_accuracy",
        );
        assert!((0.0..=1.0).contains(&acc), "{acc}");
    }
    let first = metric(&r, "loss_curve[cell=2_02_002,epoch=1]", "train_loss");
    assert!(first.is_finite() && first > 0.0);
    let md = report(&p, &cache, &ws.path().join("report"), &sets).unwrap();
    assert!(
        md.contains("lambda_min_bound")
            && md.contains("fraction_kept")
            && md.contains("Test accuracy of the pick")
            && md.contains("NASWOT + filter 17.9 s"),
        "{md}"
    );
}

#[test]
fn teg_nas_scores_correlates_searches_and_shares_training_with_nb201_rerank() {
    let ws = tempfile::tempdir().unwrap();
    let cache = ws.path().join("cache");
    // The vars both pipelines read for `data` and `train_benchmark`, shrunk the same way.
    let shared = [
        "stages.data.op=data.synthetic_images",
        "stages.data.samples=240",
        "vars.channels=2",
        "vars.epochs=1",
        "vars.seeds=[0]",
        "vars.archs=[\"3_30_243\", \"1_11_042\", \"4_12_104\", \"2_44_120\"]",
    ];
    let mut rerank_sets = shared.to_vec();
    rerank_sets.push("vars.top_k_table=[100]");
    let first = run(&pipeline("nb201_rerank.yaml"), &cache, &rerank_sets);
    assert_eq!(stages(&first, "train_benchmark").len(), 4);

    let p = pipeline("teg_nas.yaml");
    let mut sets = shared.to_vec();
    sets.extend([
        "vars.proxy={channels: 1, batch: 4, repeats: 1, region_samples: 200}",
        "vars.population=4",
        "vars.tournament=2",
        "vars.cycles=2",
        "vars.steps=2",
        "vars.random_samples=3",
    ]);
    let r = run(&p, &cache, &sets);
    // The benchmark-recipe training of nb201_rerank is reused: same keys, no training reruns.
    let trained = stages(&r, "train_benchmark");
    assert_eq!(trained.len(), 4);
    for s in &trained {
        assert_eq!(s["status"], "cached", "{s}");
        let twin = stage(&first, s["name"].as_str().unwrap());
        assert_eq!(s["key"], twin["key"]);
    }
    assert_eq!(stage(&r, "data")["status"], "cached");
    // Every listed cell is scored with the four indicators.
    let scored = output_json(&r, "score", "search.json");
    assert_eq!(scored["trajectory"].as_array().unwrap().len(), 4);
    assert_eq!(
        scored["indicators"],
        serde_json::json!(["ntk", "regions", "generalization", "naswot"])
    );
    assert_eq!(metric(&r, "correlate", "num_archs"), 4.0);
    let rank_sum = metric(&r, "tau[indicator=rank_sum]", "tau");
    assert!((-1.0..=1.0).contains(&rank_sum), "{rank_sum}");
    assert_eq!(metric(&r, "tau[indicator=rank_sum]", "n"), 4.0);
    // Four searches, each pick trained as the cell its search chose.
    for algo in ["prune", "evolution", "reinforce", "random"] {
        let name = format!("search[algorithm={algo}]");
        let chose = output_json(&r, &name, "search.json");
        assert_eq!(chose["algorithm"], algo);
        assert!(metric(&r, &name, "seconds_total") > 0.0);
        let pick = format!("train_pick[algorithm={algo},seed=0]");
        let model = output_json(&r, &pick, "model.json");
        let cell = chose["choice"]["digits"].as_str().unwrap();
        assert!(
            model.to_string().contains(cell),
            "{algo}: {model} vs {cell}"
        );
        assert!((0.0..=1.0).contains(&metric(&r, &pick, "test_accuracy")));
    }
    // Pruning starts without `none` and removes one op per edge per round: 3 rounds of
    // supernets, then the cell, which never holds `none` (digit 0). The TE-NAS stage prunes by
    // kappa and R, the TEG variant also by G.
    for (name, indicators) in [
        ("search_tenas", serde_json::json!(["ntk", "regions"])),
        (
            "search[algorithm=prune]",
            serde_json::json!(["ntk", "regions", "generalization"]),
        ),
    ] {
        let s = output_json(&r, name, "search.json");
        assert_eq!(s["prune_rounds"].as_array().unwrap().len(), 3, "{name}");
        assert_eq!(s["indicators"], indicators, "{name}");
        let digits = s["choice"]["digits"].as_str().unwrap();
        assert!(!digits.contains('0'), "{name} kept none: {digits}");
    }
    assert_eq!(stages(&r, "train_pick_tenas").len(), 1);
    let md = report(&p, &cache, &ws.path().join("report"), &sets);
    match md {
        Ok(md) => assert!(
            md.contains("Kendall tau of each indicator")
                && md.contains("Search time per algorithm")
                && md.contains("-0.42"),
            "{md}"
        ),
        // With 4 cells an indicator can fail on all but one: tau is then undefined, not made up.
        Err(e) => assert!(e.contains("tau[indicator="), "{e}"),
    }
}
