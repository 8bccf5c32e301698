//! The architecture-aware maximal learning rate and initialisation
//! (`docs/methods/arch-aware.md` §2, §3).

use serde::Serialize;

use super::paths::{Cell, CellKind, CellPath};
use super::ArchError;
use nn::VarianceHook;

/// q_base: the kernel size of the base network's convolutions (§3).
pub const Q_BASE: usize = 3;

/// The predicted maximal LR of one topology against a base topology.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LrPrediction {
    /// eta*, in the same units as the base LR.
    pub lr: f64,
    /// eta* / eta_base.
    pub lr_ratio: f64,
    /// sum over the target's paths of L_p^3.
    pub sum_l3: f64,
    /// sum over the base's paths of L^3.
    pub base_sum_l3: f64,
    pub num_paths: usize,
    /// q_base / q (1 for MLPs).
    pub q_factor: f64,
    /// L_p = d_p + fixed layers, per target path in path order.
    pub lengths: Vec<usize>,
    pub base_lengths: Vec<usize>,
    /// False when no path has a parameterised layer (the formula still applies: eta_base /
    /// sqrt(P) times the kernel factor).
    pub has_parameterised_path: bool,
}

/// `docs/methods/arch-aware.md` §3: L_p = d_p + fixed layers outside the DAG
/// (+3 MLP/CNN, +1 NB201).
pub fn path_lengths(kind: CellKind, paths: &[CellPath]) -> Vec<usize> {
    paths
        .iter()
        .map(|p| p.depth + kind.fixed_layers())
        .collect()
}

/// `docs/methods/arch-aware.md` §3: sum over paths p of L_p^3 (dimensionless).
pub fn sum_cubed(lengths: &[usize]) -> f64 {
    lengths.iter().map(|&l| (l as f64).powi(3)).sum()
}

/// arXiv 2402.17440 §3: eta* = eta_base * sqrt(sum_base L^3 / sum_target L_p^3) * (q_base / q),
/// on every connected cell, as the reference computes it (VITA-Group principled_scaling_lr_init
/// `main.py` `auto_scale_lr_depth_width`): a cell whose paths hold no layer still has
/// L_p = the fixed layers per path, so it gets eta_base / sqrt(P) with P paths (NB201: L_p = 1,
/// base [1]), not eta_base.
///
/// `kernel` is q for CNN and NB201 cells (default [`Q_BASE`]); MLPs take none.
pub fn maximal_lr(
    kind: CellKind,
    target: &[CellPath],
    base: &[CellPath],
    base_lr: f64,
    kernel: Option<usize>,
) -> Result<LrPrediction, ArchError> {
    if !(base_lr.is_finite() && base_lr > 0.0) {
        return Err(ArchError::invalid(
            "base_lr",
            format!("{base_lr} must be a finite positive learning rate"),
        ));
    }
    let q_factor = match (kind.has_kernel(), kernel) {
        (false, Some(k)) => {
            return Err(ArchError::invalid(
                "kernel",
                format!(
                    "kernel {k} given for an mlp topology; MLPs have no kernel-size factor \
                     (remove it or use kind: cnn)"
                ),
            ))
        }
        (false, None) => 1.0,
        (true, Some(0)) => return Err(ArchError::invalid("kernel", "must be at least 1")),
        (true, k) => Q_BASE as f64 / k.unwrap_or(Q_BASE) as f64,
    };
    if target.is_empty() || base.is_empty() {
        let which = if target.is_empty() {
            "topology"
        } else {
            "base_topology"
        };
        return Err(ArchError::invalid(
            which,
            "has no input->output path; it is not a valid network",
        ));
    }
    let lengths = path_lengths(kind, target);
    let base_lengths = path_lengths(kind, base);
    let sum_l3 = sum_cubed(&lengths);
    let base_sum_l3 = sum_cubed(&base_lengths);
    let has_parameterised_path = target.iter().any(|p| p.depth > 0);
    let lr_ratio = (base_sum_l3 / sum_l3).sqrt() * q_factor;
    Ok(LrPrediction {
        lr: base_lr * lr_ratio,
        lr_ratio,
        sum_l3,
        base_sum_l3,
        num_paths: target.len(),
        q_factor,
        lengths,
        base_lengths,
        has_parameterised_path,
    })
}

/// Parses both topologies and applies [`maximal_lr`]; `base_topology` defaults per kind.
pub fn predict_lr(
    kind: CellKind,
    topology: &str,
    base_topology: Option<&str>,
    base_lr: f64,
    kernel: Option<usize>,
) -> Result<(LrPrediction, Vec<CellPath>, Vec<CellPath>), ArchError> {
    let target = Cell::parse(kind, "topology", topology)?.connected_paths("topology", topology)?;
    let base_str = base_topology.unwrap_or(kind.default_base_topology());
    let base =
        Cell::parse(kind, "base_topology", base_str)?.connected_paths("base_topology", base_str)?;
    let pred = maximal_lr(kind, &target, &base, base_lr, kernel)?;
    Ok((pred, target, base))
}

/// How one layer's weights are drawn under the architecture-aware init.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerVariance {
    /// Layer name as the model builders pass it to the init hook (`*` = every cell).
    pub layer: String,
    /// Edge position in the topology string (cell layers only).
    pub edge: Option<usize>,
    /// Source node of the edge (cell layers only).
    pub source: Option<usize>,
    /// d_in: existing incoming edges of the source node (input node: 1).
    pub in_degree: usize,
    /// The rule in words, e.g. `2 / (d_in * fan_in)`.
    pub rule: &'static str,
    /// Var(W) = multiplier / fan_in (cell and stem) or multiplier / fan_in^2 (readout).
    pub multiplier: f64,
    pub fan_in: Option<usize>,
    /// Var(W), when the fan-in is known.
    pub variance: Option<f64>,
}

/// `docs/methods/arch-aware.md` §2 (the reference code's reading): a parameterised edge s -> t
/// draws W ~ N(0, 2 / (d_in(s) * fan_in)), where d_in(s) is the in-degree of the *source* node,
/// since the layer multiplies the source's summed value (the paper prints the target's in-degree;
/// both normalise the same sum). A source without incoming edges holds zero, so d_in is taken as 1.
pub fn edge_variance(in_degree: usize, fan_in: usize) -> f64 {
    2.0 / (in_degree.max(1) as f64 * fan_in.max(1) as f64)
}

/// `docs/methods/arch-aware.md` §2: readout std = 2 / fan, i.e. Var(W) = 4 / fan_in^2.
pub fn readout_variance(fan_in: usize) -> f64 {
    let f = fan_in.max(1) as f64;
    4.0 / (f * f)
}

/// The per-layer variances of a cell's network. `width` gives numeric variances for MLP
/// (fan_in = width) and CNN cells (fan_in = width * k^2); NB201 lists the multipliers only,
/// since its channel count changes per stage.
pub fn init_variances(cell: &Cell, width: Option<usize>, kernel: usize) -> Vec<LayerVariance> {
    let (prefix, suffix, readout) = match cell.kind {
        CellKind::Mlp => ("", "", "readout"),
        CellKind::Cnn => ("", ".conv", "readout"),
        CellKind::Nb201 => ("blocks.*.", ".conv", "classifier"),
    };
    let edge_fan = match cell.kind {
        CellKind::Mlp => width,
        CellKind::Cnn => width.map(|w| w.saturating_mul(kernel).saturating_mul(kernel)),
        CellKind::Nb201 => None,
    };
    let readout_fan = match cell.kind {
        CellKind::Nb201 => None,
        _ => width,
    };
    let mut out = vec![LayerVariance {
        layer: "stem".to_string(),
        edge: None,
        source: None,
        in_degree: 1,
        rule: "2 / fan_in",
        multiplier: 2.0,
        fan_in: None,
        variance: None,
    }];
    for (pos, _, s, op) in cell.dag.edges() {
        if !cell.kind.is_parameterised(op) {
            continue;
        }
        let d_in = cell.dag.in_degree(s);
        out.push(LayerVariance {
            layer: format!("{prefix}edges.{pos}{suffix}"),
            edge: Some(pos),
            source: Some(s),
            in_degree: d_in,
            rule: "2 / (d_in * fan_in)",
            multiplier: 2.0 / d_in.max(1) as f64,
            fan_in: edge_fan,
            variance: edge_fan.map(|f| edge_variance(d_in, f)),
        });
    }
    if cell.kind == CellKind::Nb201 {
        for (name, d) in REDUCTION_DEGREES {
            let suffix = if name == "shortcut" { "" } else { ".conv" };
            out.push(LayerVariance {
                layer: format!("blocks.*.{name}{suffix}"),
                edge: None,
                source: None,
                in_degree: d,
                rule: "2 / (deg * fan_in), reduction block",
                multiplier: 2.0 / d as f64,
                fan_in: None,
                variance: None,
            });
        }
    }
    out.push(LayerVariance {
        layer: readout.to_string(),
        edge: None,
        source: None,
        in_degree: 1,
        rule: "4 / fan_in^2",
        multiplier: 4.0,
        fan_in: readout_fan,
        variance: readout_fan.map(readout_variance),
    });
    out
}

/// The NB201 reduction block's in-degrees in the reference init (VITA-Group
/// principled_scaling_lr_init `models/utils.py` `_init` on `ResNetBasicblock`): conv_a and the
/// shortcut read the block input, which is counted as a sum of two (the residual branch and the
/// shortcut meet there), conv_b reads conv_a's output alone.
pub const REDUCTION_DEGREES: [(&str, usize); 3] = [("conv_a", 2), ("conv_b", 1), ("shortcut", 2)];

/// The degree of an NB201 reduction-block layer named `...{conv_a,conv_b}.conv` or
/// `...shortcut`.
fn reduction_degree(layer: &str) -> Option<usize> {
    let name = layer.strip_suffix(".conv").unwrap_or(layer);
    let (_, last) = name.rsplit_once('.')?;
    REDUCTION_DEGREES
        .iter()
        .find(|(n, _)| *n == last)
        .map(|&(_, d)| d)
}

/// The architecture-aware init as an [`nn::Init`] hook: cell edges by source in-degree,
/// the stem by 2 / fan_in, NB201 reduction blocks by [`REDUCTION_DEGREES`], the readout
/// (`readout`, `classifier`) by 4 / fan_in^2.
#[derive(Clone, Debug)]
pub struct ArchAwareInit {
    pub cell: Cell,
}

impl ArchAwareInit {
    /// The source node of a cell layer named `...edges.{pos}` or `...edges.{pos}.conv`.
    fn edge_source(&self, layer: &str) -> Option<usize> {
        let name = layer.strip_suffix(".conv").unwrap_or(layer);
        let (head, pos) = name.rsplit_once('.')?;
        if !(head == "edges" || head.ends_with(".edges")) {
            return None;
        }
        let pos: usize = pos.parse().ok()?;
        let (_, _, s, op) = self.cell.dag.edges().nth(pos)?;
        self.cell.kind.is_parameterised(op).then_some(s)
    }
}

impl VarianceHook for ArchAwareInit {
    fn weight_variance(&self, layer: &str, fan_in: usize, _fan_out: usize) -> Option<f64> {
        if layer == "readout" || layer == "classifier" {
            return Some(readout_variance(fan_in));
        }
        if layer == "stem" {
            return Some(edge_variance(1, fan_in));
        }
        if self.cell.kind == CellKind::Nb201 {
            if let Some(d) = reduction_degree(layer) {
                return Some(edge_variance(d, fan_in));
            }
        }
        let s = self.edge_source(layer)?;
        Some(edge_variance(self.cell.dag.in_degree(s), fan_in))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn lr_formula_on_hand_worked_topologies() {
        // Base MLP (default "1"): one skip path, L = [0 + 3] -> sum L^3 = 27.
        // Chain "2_02_002": one path, d = 3, L = 6 -> 216; eta = eta_b * sqrt(27/216).
        let (p, _, _) = predict_lr(CellKind::Mlp, "2_02_002", None, 0.1, None).unwrap();
        assert_eq!(
            (p.lengths.clone(), p.base_lengths.clone()),
            (vec![6], vec![3])
        );
        assert!(close(p.sum_l3, 216.0) && close(p.base_sum_l3, 27.0));
        assert!(close(p.lr, 0.1 * (27.0f64 / 216.0).sqrt()), "{}", p.lr);
        assert!(close(p.lr_ratio, (0.125f64).sqrt()));
        // Parallel "1_10_222": three paths with d = 1 -> L = 4 each -> 3 * 64 = 192.
        let (p, _, _) = predict_lr(CellKind::Mlp, "1_10_222", None, 0.1, None).unwrap();
        assert_eq!(p.lengths, vec![4, 4, 4]);
        assert!(close(p.lr, 0.1 * (27.0f64 / 192.0).sqrt()));
        // Mixed "2_21_112": d = 2, 1, 2, 0 -> L = 5, 4, 5, 3 -> 125 + 64 + 125 + 27 = 341.
        let (p, _, _) = predict_lr(CellKind::Mlp, "2_21_112", None, 0.1, None).unwrap();
        assert_eq!(p.lengths, vec![5, 4, 5, 3]);
        assert!(close(p.sum_l3, 341.0));
        assert!(close(p.lr, 0.1 * (27.0f64 / 341.0).sqrt()));
        assert_eq!(p.num_paths, 4);
    }

    #[test]
    fn kernel_factor_base_and_skip_only_cells() {
        // CNN chain with k = 5: factor 3/5 on top of the path term.
        let (p, _, _) = predict_lr(CellKind::Cnn, "2_02_002", None, 0.2, Some(5)).unwrap();
        assert!(close(p.lr, 0.2 * (27.0f64 / 216.0).sqrt() * 0.6));
        // An explicit base: base "2" (L = [4], 64) against target "2_02_002" (216).
        let (p, _, _) = predict_lr(CellKind::Mlp, "2_02_002", Some("2"), 1.0, None).unwrap();
        assert!(close(p.lr, (64.0f64 / 216.0).sqrt()));
        // NB201 base [1]; all-conv3x3 cell: paths d = 3, 2, 2, 1 -> L = 4, 3, 3, 2 -> 64+27+27+8.
        let (p, _, _) = predict_lr(CellKind::Nb201, "3_33_333", None, 0.46, None).unwrap();
        assert_eq!(p.lengths, vec![4, 3, 3, 2]);
        assert!(close(p.lr, 0.46 * (1.0f64 / 126.0).sqrt()));
        // No parameterised edge on any path: the reference's eta_base / sqrt(P), not eta_base.
        // MLP "1_11": paths 0 -> 2 and 0 -> 1 -> 2, L = 3 each, base [3]: 0.1 / sqrt(2).
        let (p, _, _) = predict_lr(CellKind::Mlp, "1_11", None, 0.1, None).unwrap();
        assert!(!p.has_parameterised_path);
        assert!(close(p.lr, 0.1 / 2f64.sqrt()), "{}", p.lr);
        // NB201 skip-only "1_11_111" has P = 4 paths of L = 1: eta_base / 2.
        let (p, _, _) = predict_lr(CellKind::Nb201, "1_11_111", None, 0.46, None).unwrap();
        assert_eq!(p.num_paths, 4);
        assert!(close(p.lr, 0.23), "{}", p.lr);
        // The base itself, "1_01_001" (one skip path 0 -> 1 -> 2 -> 3): eta_base.
        let (p, _, _) = predict_lr(CellKind::Nb201, "1_01_001", None, 0.46, None).unwrap();
        assert!(close(p.lr, 0.46), "{}", p.lr);
    }

    #[test]
    fn lr_errors_are_clear() {
        let err = predict_lr(CellKind::Mlp, "2_00_000", None, 0.1, None).unwrap_err();
        assert!(matches!(err, ArchError::NoPath { .. }), "{err}");
        let err = predict_lr(CellKind::Mlp, "2_02_002", None, 0.1, Some(3)).unwrap_err();
        assert!(err.to_string().contains("kernel"), "{err}");
        let err = predict_lr(CellKind::Mlp, "2_02_002", None, -1.0, None).unwrap_err();
        assert!(err.to_string().contains("base_lr"), "{err}");
        let err = predict_lr(CellKind::Mlp, "2_03_002", None, 0.1, None).unwrap_err();
        assert_eq!(err.field(), "topology", "{err}");
    }

    #[test]
    fn init_variances_use_source_in_degree() {
        // "2_21_112": node1 <- 0 (d_in 1); node2 <- 0, 1 (d_in 2); node3 <- 0, 1, 2.
        // Linear edges: 0->1 (pos 0, source 0), 0->2 (pos 1, source 0), 2->3 (pos 5, source 2).
        let cell = Cell::parse(CellKind::Mlp, "t", "2_21_112").unwrap();
        let v = init_variances(&cell, Some(100), 3);
        let rows: Vec<(String, Option<usize>, usize, Option<f64>)> = v
            .iter()
            .map(|l| (l.layer.clone(), l.source, l.in_degree, l.variance))
            .collect();
        assert_eq!(
            rows,
            vec![
                ("stem".to_string(), None, 1, None),
                ("edges.0".to_string(), Some(0), 1, Some(2.0 / 100.0)),
                ("edges.1".to_string(), Some(0), 1, Some(2.0 / 100.0)),
                ("edges.5".to_string(), Some(2), 2, Some(2.0 / 200.0)),
                ("readout".to_string(), None, 1, Some(4.0 / 10_000.0)),
            ]
        );
        // CNN fan-in is width * k^2.
        let cnn = Cell::parse(CellKind::Cnn, "t", "2_21_112").unwrap();
        let v = init_variances(&cnn, Some(8), 5);
        assert_eq!(v[3].layer, "edges.5.conv");
        assert!(close(v[3].variance.unwrap(), 2.0 / (2.0 * 200.0)));
    }

    #[test]
    fn hook_matches_the_model_builders_names() {
        let hook = ArchAwareInit {
            cell: Cell::parse(CellKind::Nb201, "t", "3_33_133").unwrap(),
        };
        // Edge 5 is 2 -> 3; node 2 has in-degree 2.
        assert_eq!(
            hook.weight_variance("blocks.3.edges.5.conv", 90, 0),
            Some(2.0 / 180.0)
        );
        // Edge 3 is the skip 0 -> 3: no weights, base scheme.
        assert_eq!(hook.weight_variance("blocks.3.edges.3.conv", 90, 0), None);
        assert_eq!(hook.weight_variance("classifier", 10, 0), Some(0.04));
        assert_eq!(hook.weight_variance("stem", 27, 0), Some(2.0 / 27.0));
        // Reduction blocks: N(0, 2 / (deg * fan_in)), deg 2, 1, 2 (the reference's `_init`).
        assert_eq!(
            hook.weight_variance("blocks.5.conv_a.conv", 9, 0),
            Some(1.0 / 9.0)
        );
        assert_eq!(
            hook.weight_variance("blocks.5.conv_b.conv", 9, 0),
            Some(2.0 / 9.0)
        );
        assert_eq!(hook.weight_variance("blocks.5.shortcut", 4, 0), Some(0.25));
        let mlp = ArchAwareInit {
            cell: Cell::parse(CellKind::Mlp, "t", "2_21_112").unwrap(),
        };
        assert_eq!(mlp.weight_variance("edges.5", 50, 50), Some(0.02));
    }
}
