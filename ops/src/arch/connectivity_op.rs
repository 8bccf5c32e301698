//! `nngp.connectivity`: the NNGP kernel of a cell and its eigenvalue bounds, or the
//! effective-depth/width filter over a search space (`docs/methods/connectivity.md`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::filter::{filter_space, nb201_space, AcceptanceBox};
use super::nngp::{check_input_shape, kernel_stats, normalised_inputs, Gram};
use super::paths::{path_proxies, Cell, CellKind};
use super::ArchError;
use crate::{OpError, Outputs, ParamError, RunContext, TypedOp};

/// Artifact of `mode: kernel`.
pub const NNGP_FILE: &str = "nngp.json";
/// Artifact of `mode: filter`.
pub const FILTER_FILE: &str = "filter.json";

pub struct NngpConnectivityOp;

/// What the op computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Kernel and bounds of one `topology` on a batch of random unit-norm inputs.
    #[default]
    Kernel,
    /// Accept/reject every architecture of `space` by the acceptance box.
    Filter,
}

/// `space: nb201` (all 15,625 cells) or a list of topology strings of `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(untagged, expecting = "`nb201` or a list of topology strings")]
pub enum SpaceSpec {
    /// A named space: `nb201`.
    Named(String),
    /// Topology strings of `kind`.
    List(Vec<String>),
}

/// `box: [centre_d, centre_m, r_d, r_m]` (keep |d_bar - c_d| <= r_d / 2, |m_bar - c_m| <= r_m / 2),
/// or a preset: `paper_nb201` (centre (1.6, 2.2), half-radius (0.7, 0.9)), `reference_nb201`
/// (d_bar in [0.99, 2.51], m_bar in [0.99, 3.01]), `space` (computed from the space; the default).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(
    untagged,
    expecting = "[centre_d, centre_m, r_d, r_m] or one of paper_nb201, reference_nb201, space"
)]
pub enum BoxSpec {
    /// `paper_nb201`, `reference_nb201` or `space`.
    Preset(String),
    /// `[centre_d, centre_m, r_d, r_m]`.
    Values([f64; 4]),
}

/// The params of `nngp.connectivity`. `mode: kernel` reads `topology`, `batch`, `dim` and
/// `seed`; `mode: filter` reads `space`; each refuses the other's fields by name.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectivityParams {
    /// Kernel and bounds of one cell, or the filter over a space.
    pub mode: Mode,
    /// Digit alphabet of `topology` / a listed `space` (default mlp; nb201 for `space: nb201`).
    pub kind: Option<CellKind>,
    /// `mode: kernel`: the cell.
    pub topology: Option<String>,
    /// `mode: kernel`: samples (default 16, at most 256).
    pub batch: Option<usize>,
    /// `mode: kernel`: input dimension (default 32).
    pub dim: Option<usize>,
    /// `mode: kernel`: seed of the input draw (default: the stage seed).
    pub seed: Option<u64>,
    /// `mode: filter`: the search space.
    pub space: Option<SpaceSpec>,
    /// The acceptance box on (d_bar, m_bar); with `mode: kernel` it says whether the cell is
    /// accepted.
    #[serde(rename = "box")]
    pub acceptance: Option<BoxSpec>,
}

/// The validated form.
pub enum Plan {
    Kernel {
        cell: Cell,
        topology: String,
        batch: usize,
        dim: usize,
        seed: Option<u64>,
        acceptance: Option<AcceptanceBox>,
    },
    Filter {
        cells: Vec<Cell>,
        acceptance: Option<AcceptanceBox>,
    },
}

fn resolve_box(spec: &Option<BoxSpec>) -> Result<Option<AcceptanceBox>, ParamError> {
    match spec {
        None => Ok(None),
        Some(BoxSpec::Values([cd, cm, rd, rm])) => AcceptanceBox::new(*cd, *cm, *rd, *rm)
            .map(Some)
            .map_err(ParamError::from),
        Some(BoxSpec::Preset(name)) => match name.as_str() {
            "paper_nb201" => Ok(Some(AcceptanceBox::paper_nb201())),
            "reference_nb201" => Ok(Some(AcceptanceBox::reference_nb201())),
            "space" => Ok(None),
            other => Err(
                ParamError::new("box", format!("unknown box preset {other:?}")).with_fix(
                    "use paper_nb201, reference_nb201, space, or [centre_d, centre_m, r_d, r_m]",
                ),
            ),
        },
    }
}

impl Plan {
    fn resolve(p: ConnectivityParams) -> Result<Plan, ParamError> {
        let acceptance = resolve_box(&p.acceptance)?;
        match p.mode {
            Mode::Kernel => {
                if p.space.is_some() {
                    return Err(ParamError::new("space", "only used with `mode: filter`"));
                }
                if matches!(&p.acceptance, Some(BoxSpec::Preset(s)) if s == "space") {
                    return Err(ParamError::new(
                        "box",
                        "`space` computes the box from a search space; `mode: kernel` has none",
                    )
                    .with_fix("give [centre_d, centre_m, r_d, r_m] or a preset"));
                }
                let topology = p.topology.ok_or_else(|| {
                    ParamError::new("topology", "`mode: kernel` needs a topology")
                        .with_fix("add `topology: \"2_02_002\"`, or set `mode: filter`")
                })?;
                let kind = p.kind.unwrap_or(CellKind::Mlp);
                let cell = Cell::parse(kind, "topology", &topology)?;
                cell.connected_paths("topology", &topology)?;
                let batch = p.batch.unwrap_or(16);
                let dim = p.dim.unwrap_or(32);
                check_input_shape(batch, dim)?;
                Ok(Plan::Kernel {
                    cell,
                    topology,
                    batch,
                    dim,
                    seed: p.seed,
                    acceptance,
                })
            }
            Mode::Filter => {
                for (field, set) in [
                    ("topology", p.topology.is_some()),
                    ("batch", p.batch.is_some()),
                    ("dim", p.dim.is_some()),
                    ("seed", p.seed.is_some()),
                ] {
                    if set {
                        return Err(ParamError::new(
                            field,
                            "only used with `mode: kernel`; the filter reads `space`",
                        ));
                    }
                }
                let space = p.space.ok_or_else(|| {
                    ParamError::new("space", "`mode: filter` needs a space")
                        .with_fix("use `space: nb201` or a list of topology strings")
                })?;
                let cells = match space {
                    SpaceSpec::Named(name) if name == "nb201" => {
                        if matches!(p.kind, Some(k) if k != CellKind::Nb201) {
                            return Err(ParamError::new(
                                "kind",
                                "`space: nb201` holds nb201 cells; drop `kind` or set it to nb201",
                            ));
                        }
                        nb201_space()?
                    }
                    SpaceSpec::Named(other) => {
                        return Err(ParamError::new("space", format!("unknown space {other:?}"))
                            .with_fix("use `nb201` or a list of topology strings"))
                    }
                    SpaceSpec::List(list) => {
                        if list.is_empty() {
                            return Err(ParamError::new("space", "the list is empty"));
                        }
                        let kind = p.kind.unwrap_or(CellKind::Mlp);
                        list.iter()
                            .enumerate()
                            .map(|(i, t)| Cell::parse(kind, &format!("space.{i}"), t))
                            .collect::<Result<Vec<_>, _>>()?
                    }
                };
                Ok(Plan::Filter { cells, acceptance })
            }
        }
    }
}

impl TypedOp for NngpConnectivityOp {
    const NAME: &'static str = "nngp.connectivity";
    const VERSION: u32 = 1;
    const SUMMARY: &'static str =
        "NNGP kernel of a DAG cell, lambda_min bounds, P, effective depth/width; or the \
         connectivity filter over a search space";
    type Params = ConnectivityParams;
    type Config = Plan;

    fn resolve(p: ConnectivityParams) -> Result<Plan, ParamError> {
        Plan::resolve(p)
    }

    fn run(
        &self,
        plan: &Plan,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        match plan {
            Plan::Kernel {
                cell,
                topology,
                batch,
                dim,
                seed,
                acceptance,
            } => run_kernel(ctx, out, cell, topology, (*batch, *dim, *seed), *acceptance),
            Plan::Filter { cells, acceptance } => run_filter(ctx, out, cells, *acceptance),
        }
    }
}

fn run_kernel(
    ctx: &mut RunContext<'_>,
    out: &mut Outputs<'_>,
    cell: &Cell,
    topology: &str,
    (batch, dim, seed): (usize, usize, Option<u64>),
    acceptance: Option<AcceptanceBox>,
) -> Result<(), OpError> {
    let seed = seed.unwrap_or(ctx.seed);
    let paths = cell.connected_paths("topology", topology)?;
    let proxies = path_proxies(&paths).ok_or_else(|| ArchError::NoPath {
        field: "topology".into(),
        topology: topology.into(),
    })?;
    let xs = normalised_inputs(batch, dim, seed)?;
    let input = Gram::of_rows(&xs);
    let (kernel_out, stats) = kernel_stats(cell, &paths, &input)?;
    let accepted = acceptance.map(|b| b.accepts(&proxies));
    let artifact = json!({
        "topology": topology,
        "digits": cell.digits(),
        "kind": cell.kind,
        "batch": batch,
        "dim": dim,
        "seed": seed,
        "num_paths": proxies.num_paths,
        "paths": paths.iter().map(|p| json!({"nodes": p.nodes, "d_p": p.depth})).collect::<Vec<_>>(),
        "d_bar": proxies.d_bar,
        "m_bar": proxies.m_bar,
        "stats": stats,
        "box": acceptance,
        "accepted": accepted,
        "kernel_in": input.rows(),
        "kernel_out": kernel_out.rows(),
    });
    out.write_json(NNGP_FILE, &artifact)?;
    let _ = writeln!(
        ctx.log,
        "{topology}: P = {}, d_bar = {:.4}, lambda_min = {:.6}, path bound = {:.6}",
        proxies.num_paths, proxies.d_bar, stats.lambda_min, stats.lambda_min_bound
    );
    out.metric("num_paths", proxies.num_paths as f64);
    out.metric("d_bar", proxies.d_bar);
    if let Some(mb) = proxies.m_bar {
        out.metric("m_bar", mb);
    }
    out.metrics_from([
        ("lambda_min", stats.lambda_min),
        ("lambda_min_pairwise", stats.lambda_min_pairwise),
        ("lambda_min_bound", stats.lambda_min_bound),
        ("k_diag_mean", stats.diag_mean),
        ("k_offdiag_mean", stats.offdiag_mean),
        ("k_offdiag_min", stats.offdiag_min),
        ("k_offdiag_max", stats.offdiag_max),
    ]);
    if let Some(a) = accepted {
        out.metric("accepted", if a { 1.0 } else { 0.0 });
    }
    Ok(())
}

fn run_filter(
    ctx: &mut RunContext<'_>,
    out: &mut Outputs<'_>,
    cells: &[Cell],
    acceptance: Option<AcceptanceBox>,
) -> Result<(), OpError> {
    ctx.progress
        .report(&format!("filtering {} architectures", cells.len()));
    ctx.check_cancelled()?;
    let report = filter_space(cells, acceptance)?;
    out.write_json(FILTER_FILE, &report)?;
    let (dl, dh) = report.d_interval;
    let (ml, mh) = report.m_interval;
    let _ =
        writeln!(
        ctx.log,
        "box d_bar in [{dl:.4}, {dh:.4}], m_bar in [{ml:.4}, {mh:.4}] ({}): kept {} of {} ({:.2}%)",
        if report.from_space { "from the space" } else { "given" },
        report.num_accepted,
        report.space_size,
        100.0 * report.fraction_kept
    );
    let b = report.acceptance;
    out.metrics_from([
        ("space_size", report.space_size as f64),
        ("num_scorable", report.num_scorable as f64),
        ("num_accepted", report.num_accepted as f64),
        ("fraction_kept", report.fraction_kept),
        ("box_centre_d", b.centre_d),
        ("box_centre_m", b.centre_m),
        ("box_r_d", b.r_d),
        ("box_r_m", b.r_m),
    ]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::nngp::relu_arccos;
    use crate::testing::{OpRun, RunOutput};
    use crate::Op;
    use serde_json::Value;

    fn read(out: &std::path::Path, name: &str) -> Value {
        serde_json::from_slice(&std::fs::read(out.join(name)).unwrap()).unwrap()
    }

    fn run(params: Value) -> RunOutput {
        OpRun::new(params).run(&NngpConnectivityOp)
    }

    #[test]
    fn kernel_mode_end_to_end() {
        let output =
            run(json!({"topology": "2_02_002", "batch": 6, "dim": 4, "box": [2.0, 1.0, 4.0, 4.0]}));
        let (m, log) = (output.metrics(), &output.log);
        assert!(log.contains("P = 1"), "{log}");
        assert_eq!(m["num_paths"], 1.0);
        assert_eq!(m["d_bar"], 3.0);
        assert_eq!(m["accepted"], 1.0);
        let v = read(&output.out_dir, NNGP_FILE);
        assert_eq!(v["seed"], 3);
        // Chain: K_out = f^3(K_in) entrywise, diagonal 1; the bound is 1 - max f^3(K_ij).
        let kin = &v["kernel_in"];
        let mut worst = f64::INFINITY;
        for i in 0..6 {
            for j in 0..i {
                let k = kin[i][j].as_f64().unwrap();
                let f3 = relu_arccos(relu_arccos(relu_arccos(k)));
                assert!((v["kernel_out"][i][j].as_f64().unwrap() - f3).abs() < 1e-12);
                worst = worst.min(1.0 - f3);
            }
        }
        assert!((m["lambda_min_bound"] - worst).abs() < 1e-12);
        assert!(m["lambda_min"] <= m["lambda_min_pairwise"] + 1e-12);
    }

    #[test]
    fn filter_mode_end_to_end() {
        let output = run(
            json!({"mode": "filter", "space": ["2_02_002", "1_10_222", "2_21_112", "2_22_222"]}),
        );
        let m = output.metrics();
        assert_eq!(m["space_size"], 4.0);
        assert_eq!(m["num_accepted"], 1.0);
        assert_eq!(m["fraction_kept"], 0.25);
        let v = read(&output.out_dir, FILTER_FILE);
        assert_eq!(v["accepted"][0]["topology"], "2_22_222");
        assert_eq!(v["from_space"], true);
    }

    #[test]
    fn nb201_filter_with_preset_box() {
        let output = run(json!({"mode": "filter", "space": "nb201", "box": "reference_nb201"}));
        let m = output.metrics();
        assert_eq!(m["space_size"], 15_625.0);
        assert!(m["fraction_kept"] > 0.0 && m["fraction_kept"] < 1.0);
        assert!((m["box_centre_d"] - 1.75).abs() < 1e-12);
        let v = read(&output.out_dir, FILTER_FILE);
        assert!(v["accepted"][0]["arch"].as_str().unwrap().starts_with('|'));
    }

    #[test]
    fn validation_names_the_field() {
        let op = NngpConnectivityOp;
        let cases = [
            (json!({"mode": "filter"}), "space"),
            (
                json!({"mode": "filter", "space": "nb201", "topology": "2"}),
                "topology",
            ),
            (json!({"mode": "filter", "space": "darts"}), "space"),
            (
                json!({"mode": "filter", "space": "nb201", "kind": "mlp"}),
                "kind",
            ),
            (
                json!({"mode": "filter", "space": ["2_02_002", "2_3"]}),
                "space.1",
            ),
            (json!({}), "topology"),
            (json!({"topology": "2_00_000"}), "topology"),
            (json!({"topology": "2", "batch": 1}), "batch"),
            (json!({"topology": "2", "box": "space"}), "box"),
            (
                json!({"topology": "2", "box": [1.0, 1.0, -1.0, 1.0]}),
                "box",
            ),
            (json!({"topology": "2", "space": "nb201"}), "space"),
        ];
        for (params, field) in cases {
            let err = op.plan(&params).unwrap_err();
            assert_eq!(err.path, field, "{params}: {err:?}");
        }
        let err = op.plan(&json!({"topology": "2", "extra": 1})).unwrap_err();
        assert!(err.message.contains("extra"), "{err:?}");
    }
}
