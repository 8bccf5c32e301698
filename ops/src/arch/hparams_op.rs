//! `hparams.arch_aware`: the maximal LR and init variances of one topology
//! (`docs/methods/arch-aware.md` §2, §3).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::lr::{init_variances, predict_lr, LrPrediction, Q_BASE};
use super::paths::{Cell, CellKind, CellPath};
use crate::{Count, OpError, Outputs, ParamError, RunContext, TypedOp};

/// The artifact this op writes.
pub const PATHS_FILE: &str = "paths.json";

pub struct ArchAwareHparamsOp;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArchAwareParams {
    /// The cell: `"2_02_002"` digits (mlp, cnn) or a NAS-Bench-201 arch string / digits.
    pub topology: String,
    /// Which family the topology belongs to (fixes the digit meaning and the fixed layers).
    pub kind: CellKind,
    /// q, the convolution kernel size (cnn, nb201; default 3). MLPs take none.
    #[serde(default)]
    pub kernel: Option<usize>,
    /// eta_base: the measured maximal LR of the base network.
    pub base_lr: f64,
    /// The base network's cell; default `"1"` (mlp, cnn: L = [3]) or `"0_00_100"` (nb201: L = [1]).
    #[serde(default)]
    pub base_topology: Option<String>,
    /// Hidden width (mlp) or channels (cnn): turns the init multipliers into variances.
    #[serde(default)]
    pub width: Option<Count>,
}

/// Checked params and the prediction they give.
pub struct ArchAwareConfig {
    pub params: ArchAwareParams,
    /// `base_topology`, or the kind's default.
    pub base_topology: String,
    pub cell: Cell,
    pub prediction: LrPrediction,
    /// The input->output paths of the cell and of the base cell.
    pub paths: Vec<CellPath>,
    pub base_paths: Vec<CellPath>,
}

fn with_fix(e: ParamError) -> ParamError {
    match e.path.as_str() {
        "topology" | "base_topology" => e.with_fix(
            "mlp/cnn: one `_`-separated group per node with digits 0 zero, 1 skip, 2 layer \
             (\"2_02_002\"); nb201: an arch string |op~0|+|op~0|op~1|+|...| or six digits",
        ),
        _ => e,
    }
}

#[derive(Serialize)]
struct PathRecord<'a> {
    nodes: &'a [usize],
    edges: &'a [usize],
    ops: &'a [u8],
    d_p: usize,
    #[serde(rename = "L")]
    length: usize,
}

fn path_records<'a>(kind: CellKind, paths: &'a [CellPath]) -> Vec<PathRecord<'a>> {
    paths
        .iter()
        .map(|p| PathRecord {
            nodes: &p.nodes,
            edges: &p.edges,
            ops: &p.ops,
            d_p: p.depth,
            length: p.depth + kind.fixed_layers(),
        })
        .collect()
}

impl TypedOp for ArchAwareHparamsOp {
    const NAME: &'static str = "hparams.arch_aware";
    // Version 2: skip-only cells get eta_base / sqrt(P); NB201 reduction-block init rows.
    const VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "maximal LR (path formula) and per-layer init variances of a cell topology; writes paths.json";
    type Params = ArchAwareParams;
    type Config = ArchAwareConfig;

    fn resolve(p: ArchAwareParams) -> Result<ArchAwareConfig, ParamError> {
        let base_topology = p
            .base_topology
            .clone()
            .unwrap_or_else(|| p.kind.default_base_topology().to_string());
        let (prediction, paths, base_paths) = predict_lr(
            p.kind,
            &p.topology,
            p.base_topology.as_deref(),
            p.base_lr,
            p.kernel,
        )
        .map_err(|e| with_fix(e.into()))?;
        let cell = Cell::parse(p.kind, "topology", &p.topology)?;
        Ok(ArchAwareConfig {
            params: p,
            base_topology,
            cell,
            prediction,
            paths,
            base_paths,
        })
    }

    fn run(
        &self,
        c: &ArchAwareConfig,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let (p, pred) = (&c.params, &c.prediction);
        let kernel = p.kernel.unwrap_or(Q_BASE);
        let width = p.width.map(Count::get);
        let layers = init_variances(&c.cell, width, kernel);
        let artifact = json!({
            "topology": p.topology,
            "digits": c.cell.digits(),
            "kind": p.kind,
            "kernel": p.kind.has_kernel().then_some(kernel),
            "base_topology": c.base_topology,
            "base_lr": p.base_lr,
            "formula": "eta* = eta_base * sqrt(sum_base L^3 / sum_target L_p^3) * (q_base / q); \
                        L_p = d_p + fixed layers; eta_base when no path has a layer",
            "fixed_layers": p.kind.fixed_layers(),
            "lr": pred.lr,
            "lr_ratio": pred.lr_ratio,
            "num_paths": pred.num_paths,
            "sum_L3": pred.sum_l3,
            "base_sum_L3": pred.base_sum_l3,
            "q_factor": pred.q_factor,
            "has_parameterised_path": pred.has_parameterised_path,
            "paths": path_records(p.kind, &c.paths),
            "base_paths": path_records(p.kind, &c.base_paths),
            "init": {
                "reading": "cell edge s->t: Var(W) = 2 / (d_in(s) * fan_in) with d_in the \
                            in-degree of the SOURCE node (the reference code's reading; the \
                            paper prints the target's), input node d_in = 1; stem 2 / fan_in; \
                            readout std 2 / fan_in (Var 4 / fan_in^2); biases 0, BatchNorm 1/0",
                "width": width,
                "layers": layers,
            },
        });
        out.write_json(PATHS_FILE, &artifact)?;
        let _ = writeln!(
            ctx.log,
            "{} ({}): {} path(s), sum L^3 = {} vs base {} -> lr = {:.6} ({:.4} x base)",
            p.topology,
            p.kind.name(),
            pred.num_paths,
            pred.sum_l3,
            pred.base_sum_l3,
            pred.lr,
            pred.lr_ratio
        );
        out.metric("lr", pred.lr);
        out.metric("lr_ratio", pred.lr_ratio);
        out.metric("num_paths", pred.num_paths as f64);
        out.metric("sum_L3", pred.sum_l3);
        out.metric("base_sum_L3", pred.base_sum_l3);
        out.metric("q_factor", pred.q_factor);
        out.metric(
            "max_path_layers",
            c.paths.iter().map(|q| q.depth).max().unwrap_or(0) as f64,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::OpRun;
    use crate::Op;
    use serde_json::Value;

    #[test]
    fn run_writes_paths_and_metrics() {
        let output =
            OpRun::new(json!({"topology": "2_21_112", "kind": "mlp", "base_lr": 0.1, "width": 64}))
                .run(&ArchAwareHparamsOp);
        let (m, log) = (output.metrics(), &output.log);
        assert!((m["lr"] - 0.1 * (27.0f64 / 341.0).sqrt()).abs() < 1e-12);
        assert_eq!(m["num_paths"], 4.0);
        assert_eq!(m["sum_L3"], 341.0);
        assert!(log.contains("4 path(s)"), "{log}");
        let v: Value =
            serde_json::from_slice(&std::fs::read(output.out_dir.join(PATHS_FILE)).unwrap())
                .unwrap();
        assert_eq!(v["paths"][0]["nodes"], json!([0, 1, 2, 3]));
        assert_eq!(v["paths"][0]["L"], 5);
        assert_eq!(
            v["base_paths"],
            json!([{"nodes": [0, 1], "edges": [0], "ops": [1], "d_p": 0, "L": 3}])
        );
        assert_eq!(v["init"]["layers"][3]["layer"], "edges.5");
        assert_eq!(v["init"]["layers"][3]["variance"], json!(2.0 / 128.0));
        assert_eq!(v["kernel"], Value::Null);
    }

    #[test]
    fn validation_names_the_field() {
        let op = ArchAwareHparamsOp;
        let err = op
            .plan(&json!({"topology": "2_00_000", "kind": "mlp", "base_lr": 0.1}))
            .unwrap_err();
        assert_eq!(err.path, "topology");
        assert!(err.message.contains("no input->output path"), "{err:?}");
        let err = op
            .plan(&json!({"topology": "2_02_002", "kind": "mlp", "base_lr": 0.1, "kernel": 5}))
            .unwrap_err();
        assert_eq!(err.path, "kernel");
        let err = op
            .plan(&json!({"topology": "2_0x_002", "kind": "cnn", "base_lr": 0.1}))
            .unwrap_err();
        assert_eq!(err.path, "topology");
        assert!(err.fix.is_some());
        let err = op
            .plan(&json!({"topology": "2", "kind": "mlp", "base_lr": 0.1, "lr": 1}))
            .unwrap_err();
        assert!(err.message.contains("lr"), "{err:?}");
        let err = op
            .plan(&json!({"topology": "2", "kind": "rnn", "base_lr": 0.1}))
            .unwrap_err();
        assert_eq!(err.path, "kind");
        let err = op
            .plan(&json!({"topology": "2", "kind": "mlp", "base_lr": 0.1, "width": 0}))
            .unwrap_err();
        assert_eq!(
            (err.path.as_str(), err.message.as_str()),
            ("width", "must be at least 1")
        );
        // A NAS-Bench-201 arch string with k = 3.
        op.plan(&json!({
            "topology": "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|",
            "kind": "nb201", "base_lr": 0.46
        }))
        .unwrap();
    }
}
