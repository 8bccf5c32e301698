//! `lr.pick`: the empirical maximal LR from a grid of `lr.probe` results
//! (`docs/methods/arch-aware.md` §3: the LR with the smallest training loss after
//! one epoch, diverged runs counted as infinite loss).
//!
//! Input contract: `probes`, a list input over `lr.probe` stages (`"probe[*]"` or
//! `"probe[topology=2_02_002,*]"`); each item folder holds `metrics.json` with `lr`, and either
//! `train_loss` or `diverged: 1`. Items with the same `lr` (e.g. several seeds) are averaged;
//! one diverged item makes that LR's loss infinite.
//!
//! Optionally `prediction` (a `hparams.arch_aware` result: `paths.json`) and `base` (another
//! `lr.pick` result: `metrics.json` with `lr_star`): then `lr_predicted` = base's measured
//! `lr_star` x the formula's `lr_ratio` (without `base`: the formula's `lr` from its own
//! `base_lr`), so predicted and probed LRs sit side by side in one stage's metrics.

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{read_json, Input, OpError, Outputs, ParamError, RunContext, TypedOp, METRICS_FILE};

/// The artifact listing every grid point.
pub const GRID_FILE: &str = "grid.json";
pub const PROBES_INPUT: &str = "probes";
pub const PREDICTION_INPUT: &str = "prediction";
pub const BASE_INPUT: &str = "base";

pub struct LrPickOp;

/// `lr.pick` takes no params: everything comes from its inputs.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LrPickParams {}

/// One LR of the grid after averaging its probes.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GridPoint {
    pub lr: f64,
    /// Mean final training loss over the probes at this LR; `None` = infinite (diverged).
    pub loss: Option<f64>,
    pub probes: usize,
    pub diverged: usize,
}

/// What one probe folder says: its LR and its loss (`None` = diverged).
fn read_probe(dir: &Path) -> Result<(f64, Option<f64>), OpError> {
    let map = read_metrics(dir)?;
    let lr = map.get("lr").copied().ok_or_else(|| {
        OpError::Failed(format!(
            "{}: metrics.json has no `lr`; `probes` must be lr.probe results",
            dir.display()
        ))
    })?;
    let diverged = map.get("diverged").copied() == Some(1.0);
    let loss = map.get("train_loss").copied().filter(|l| l.is_finite());
    match (diverged, loss) {
        (true, _) => Ok((lr, None)),
        (false, Some(l)) => Ok((lr, Some(l))),
        (false, None) => Err(OpError::Failed(format!(
            "{}: metrics.json has neither `train_loss` nor `diverged: 1`",
            dir.display()
        ))),
    }
}

/// A file that must be there: its JSON.
fn read_required(path: &Path) -> Result<Value, OpError> {
    read_json(path)?
        .ok_or_else(|| OpError::Failed(format!("cannot read {}: no such file", path.display())))
}

/// A flat `metrics.json` of name -> number.
fn read_metrics(dir: &Path) -> Result<BTreeMap<String, f64>, OpError> {
    let path = dir.join(METRICS_FILE);
    let Value::Object(m) = read_required(&path)? else {
        return Err(OpError::Failed(format!(
            "{} is not an object of name -> number",
            path.display()
        )));
    };
    Ok(m.into_iter()
        .filter_map(|(k, v)| v.as_f64().map(|x| (k, x)))
        .collect())
}

/// Groups probes by LR (ascending): mean loss, infinite when any probe at that LR diverged.
pub fn grid(probes: &[(f64, Option<f64>)]) -> Vec<GridPoint> {
    let mut by_lr: BTreeMap<u64, (f64, Vec<Option<f64>>)> = BTreeMap::new();
    for &(lr, loss) in probes {
        // Positive finite floats order like their bit patterns.
        by_lr
            .entry(lr.to_bits())
            .or_insert((lr, Vec::new()))
            .1
            .push(loss);
    }
    by_lr
        .into_values()
        .map(|(lr, losses)| {
            let diverged = losses.iter().filter(|l| l.is_none()).count();
            let loss =
                (diverged == 0).then(|| losses.iter().flatten().sum::<f64>() / losses.len() as f64);
            GridPoint {
                lr,
                loss,
                probes: losses.len(),
                diverged,
            }
        })
        .collect()
}

/// `docs/methods/arch-aware.md` §3: the LR with the smallest loss (diverged = infinite); ties go to
/// the smaller LR. `None` when every point diverged.
pub fn pick(points: &[GridPoint]) -> Option<&GridPoint> {
    points.iter().filter(|p| p.loss.is_some()).min_by(|a, b| {
        a.loss
            .unwrap_or(f64::INFINITY)
            .total_cmp(&b.loss.unwrap_or(f64::INFINITY))
            .then(a.lr.total_cmp(&b.lr))
    })
}

fn one_dir<'a>(ctx: &'a RunContext<'_>, name: &str) -> Result<Option<&'a Path>, OpError> {
    match ctx.inputs.get(name) {
        None => Ok(None),
        Some(Input::One(p)) => Ok(Some(p)),
        Some(Input::Many { .. }) => Err(OpError::Failed(format!(
            "input `{name}` selects several stages; point it at one"
        ))),
    }
}

impl TypedOp for LrPickOp {
    const NAME: &'static str = "lr.pick";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "the empirical maximal LR of a grid of lr.probe results (smallest training loss, \
         diverged = infinite); optional `prediction` + `base` add the formula's LR beside it";
    type Params = LrPickParams;
    type Config = LrPickParams;

    fn resolve(p: LrPickParams) -> Result<LrPickParams, ParamError> {
        Ok(p)
    }

    fn required_inputs(_: &LrPickParams) -> Vec<String> {
        vec![PROBES_INPUT.to_string()]
    }

    fn run(
        &self,
        _: &LrPickParams,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        let items = match ctx.input(PROBES_INPUT)? {
            Input::Many { items, .. } => items.clone(),
            Input::One(p) => vec![(String::new(), p.clone())],
        };
        let mut probes = Vec::with_capacity(items.len());
        for (_, dir) in &items {
            ctx.check_cancelled()?;
            probes.push(read_probe(dir)?);
        }
        let points = grid(&probes);
        out.write_json(GRID_FILE, &points)?;
        let best = pick(&points).cloned().ok_or_else(|| {
            OpError::Failed(format!(
                "all {} grid LRs diverged (smallest {:.3e}); extend the grid downwards",
                points.len(),
                points.first().map(|p| p.lr).unwrap_or(f64::NAN)
            ))
        })?;
        let at_edge = points.first().map(|p| p.lr) == Some(best.lr)
            || points.last().map(|p| p.lr) == Some(best.lr);
        let _ = writeln!(
            ctx.log,
            "{} LR(s), {} diverged: lr* = {:.4e} (loss {:.4}){}",
            points.len(),
            points.iter().filter(|p| p.loss.is_none()).count(),
            best.lr,
            best.loss.unwrap_or(f64::NAN),
            if at_edge {
                "; at the edge of the grid, so the true maximum may lie beyond it"
            } else {
                ""
            }
        );
        out.metric("lr_star", best.lr);
        out.metric("log10_lr_star", best.lr.log10());
        out.metric("loss_star", best.loss.unwrap_or(f64::NAN));
        out.metric("grid_size", points.len() as f64);
        out.metric(
            "grid_diverged",
            points.iter().filter(|p| p.loss.is_none()).count() as f64,
        );
        out.metric("at_grid_edge", if at_edge { 1.0 } else { 0.0 });
        if let Some(dir) = one_dir(ctx, PREDICTION_INPUT)? {
            let base = one_dir(ctx, BASE_INPUT)?;
            add_prediction(dir, base, best.lr, out)?;
        }
        out.write_metrics_file()
    }
}

/// `lr_predicted` beside the probed LR: the formula's ratio (from `prediction`, a
/// hparams.arch_aware result) times `base`'s measured `lr_star`, or the formula's own LR.
fn add_prediction(
    prediction: &Path,
    base: Option<&Path>,
    lr_star: f64,
    out: &mut Outputs<'_>,
) -> Result<(), OpError> {
    let path = prediction.join(super::hparams_op::PATHS_FILE);
    let v = read_required(&path)?;
    let field = |k: &str| {
        v.get(k).and_then(Value::as_f64).ok_or_else(|| {
            OpError::Failed(format!(
                "{}: no `{k}`; `prediction` must be a hparams.arch_aware result",
                path.display()
            ))
        })
    };
    let (ratio, formula_lr) = (field("lr_ratio")?, field("lr")?);
    let predicted = match base {
        Some(base) => {
            let base_star = read_metrics(base)?.get("lr_star").copied().ok_or_else(|| {
                OpError::Failed(format!(
                    "{}: no `lr_star`; `base` must be an lr.pick result",
                    base.display()
                ))
            })?;
            out.metric("base_lr_star", base_star);
            base_star * ratio
        }
        None => formula_lr,
    };
    out.metric("lr_ratio", ratio);
    out.metric("lr_predicted", predicted);
    out.metric("log10_lr_predicted", predicted.log10());
    out.metric("log10_probed_over_predicted", (lr_star / predicted).log10());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::OpRun;
    use serde_json::json;

    fn probe_dir(root: &Path, name: &str, metrics: Value) -> std::path::PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(METRICS_FILE), metrics.to_string()).unwrap();
        d
    }

    #[test]
    fn grid_averages_seeds_and_counts_divergence_as_infinite() {
        let probes = [
            (0.1, Some(1.0)),
            (0.1, Some(2.0)),
            (0.4, Some(0.5)),
            (0.4, None),
            (0.2, Some(1.2)),
        ];
        let g = grid(&probes);
        assert_eq!(
            g.iter().map(|p| (p.lr, p.loss)).collect::<Vec<_>>(),
            vec![(0.1, Some(1.5)), (0.2, Some(1.2)), (0.4, None)]
        );
        // 0.4 has the smallest single loss but one seed diverged: infinite.
        assert_eq!(pick(&g).map(|p| p.lr), Some(0.2));
        // Ties go to the smaller LR.
        let tie = grid(&[(0.3, Some(1.0)), (0.1, Some(1.0))]);
        assert_eq!(pick(&tie).map(|p| p.lr), Some(0.1));
        assert_eq!(pick(&grid(&[(0.3, None)])), None);
    }

    #[test]
    fn run_reads_probes_and_adds_the_prediction() {
        let ws = tempfile::tempdir().unwrap();
        let root = ws.path();
        let items: Vec<(String, std::path::PathBuf)> = [
            (
                "lr=0.01",
                json!({"lr": 0.01, "train_loss": 2.0, "diverged": 0}),
            ),
            (
                "lr=0.1",
                json!({"lr": 0.1, "train_loss": 1.0, "diverged": 0}),
            ),
            ("lr=1", json!({"lr": 1.0, "diverged": 1})),
        ]
        .into_iter()
        .map(|(l, m)| (l.to_string(), probe_dir(root, l, m)))
        .collect();
        let base = probe_dir(root, "base", json!({"lr_star": 0.4}));
        let pred = root.join("pred");
        std::fs::create_dir_all(&pred).unwrap();
        std::fs::write(
            pred.join("paths.json"),
            json!({"lr": 0.05, "lr_ratio": 0.25}).to_string(),
        )
        .unwrap();
        let probes = Input::Many {
            dir: root.to_path_buf(),
            items,
        };
        let output = OpRun::new(json!({}))
            .input_as(PROBES_INPUT, probes)
            .input(BASE_INPUT, base)
            .input(PREDICTION_INPUT, pred)
            .run(&LrPickOp);
        let (m, log, out) = (output.metrics(), &output.log, &output.out_dir);
        assert_eq!(m["lr_star"], 0.1);
        assert_eq!(m["loss_star"], 1.0);
        assert_eq!(m["grid_diverged"], 1.0);
        assert_eq!(m["at_grid_edge"], 0.0);
        assert!((m["lr_predicted"] - 0.1).abs() < 1e-15, "{m:?}");
        assert!(m["log10_probed_over_predicted"].abs() < 1e-12);
        assert!(log.contains("lr* = 1.0000e-1"), "{log}");
        let written: BTreeMap<String, f64> =
            serde_json::from_slice(&std::fs::read(out.join(METRICS_FILE)).unwrap()).unwrap();
        assert_eq!(written["lr_star"], 0.1);
        let g: Vec<Value> =
            serde_json::from_slice(&std::fs::read(out.join(GRID_FILE)).unwrap()).unwrap();
        assert_eq!(g[2]["loss"], Value::Null);
    }

    #[test]
    fn all_diverged_is_a_clear_error() {
        let ws = tempfile::tempdir().unwrap();
        let d = probe_dir(ws.path(), "a", json!({"lr": 5.0, "diverged": 1}));
        let probes = Input::Many {
            dir: ws.path().to_path_buf(),
            items: vec![("lr=5".into(), d)],
        };
        let output = OpRun::new(json!({}))
            .input_as(PROBES_INPUT, probes)
            .run(&LrPickOp);
        let e = output.result.unwrap_err().to_string();
        assert!(e.contains("extend the grid downwards"), "{e}");
    }
}
