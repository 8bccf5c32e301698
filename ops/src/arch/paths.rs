//! Cells as DAGs and their input->output paths (`docs/methods/arch-aware.md` §1, §3;
//! `docs/methods/connectivity.md` §3).
//!
//! The topology strings are parsed by [`nn::models::topology::Dag`]; this file only adds
//! what the analysis needs on top: which op codes are parameterised for a cell kind, the path
//! list, and the path statistics P, d_p, effective depth and width.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ArchError;
use nn::models::topology::{Dag, NB201_OPS};
use nn::NnError;

/// Which family a topology string belongs to; it fixes the digit meaning and the fixed layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CellKind {
    /// `mlp_dag`: digits 0 zero, 1 skip, 2 Linear+ReLU.
    Mlp,
    /// `cnn_dag`: digits 0 zero, 1 skip, 2 ReLU-Conv(k x k)-BN.
    Cnn,
    /// NAS-Bench-201 cell: 0 none, 1 skip, 2 conv1x1, 3 conv3x3, 4 avgpool3x3.
    Nb201,
}

/// The most paths enumerated for one cell; a dense digit string with n nodes has 2^(n-2), so
/// this admits every cell up to 18 nodes.
pub const MAX_PATHS: usize = 1 << 16;

impl CellKind {
    pub fn name(self) -> &'static str {
        match self {
            CellKind::Mlp => "mlp",
            CellKind::Cnn => "cnn",
            CellKind::Nb201 => "nb201",
        }
    }

    /// Parses `topology` with the kind's digit alphabet (NB201 also takes its arch string).
    pub fn parse(self, field: &str, topology: &str) -> Result<Dag, ArchError> {
        let parsed = match self {
            CellKind::Mlp | CellKind::Cnn => Dag::parse_digits(field, topology.trim(), 2),
            CellKind::Nb201 => Dag::parse_nb201(field, topology),
        };
        parsed.map_err(|e| match e {
            NnError::InvalidSpec { field, message } => ArchError::Invalid { field, message },
            other => ArchError::Topology(other.to_string()),
        })
    }

    /// Whether an op code is a parameterised layer (counts towards d_p).
    /// `docs/methods/arch-aware.md` §1: Linear / conv are layers; skip, avg-pool and zero are not.
    pub fn is_parameterised(self, op: u8) -> bool {
        match self {
            CellKind::Mlp | CellKind::Cnn => op == 2,
            CellKind::Nb201 => op == 2 || op == 3,
        }
    }

    /// Layers every path passes outside the cell.
    /// `docs/methods/arch-aware.md` §3: +3 (stem/head) for MLP/CNN, +1 for NAS-Bench-201.
    pub fn fixed_layers(self) -> usize {
        match self {
            CellKind::Mlp | CellKind::Cnn => 3,
            CellKind::Nb201 => 1,
        }
    }

    /// The shallowest base network of §3: one path with no parameterised layer, so that its
    /// path lengths are `[3]` (MLP/CNN: a single skip edge) and `[1]` (NB201: the
    /// cell whose only edge is the skip 0 -> 3).
    pub fn default_base_topology(self) -> &'static str {
        match self {
            CellKind::Mlp | CellKind::Cnn => "1",
            CellKind::Nb201 => "0_00_100",
        }
    }

    /// Whether the kind has convolutions, i.e. a kernel size q (§3: MLPs have no q factor).
    pub fn has_kernel(self) -> bool {
        !matches!(self, CellKind::Mlp)
    }
}

/// One input->output path through existing edges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CellPath {
    /// Nodes visited, `0 ... n-1`.
    pub nodes: Vec<usize>,
    /// Edge positions (string order, as [`Dag::edges`] numbers them) along the path.
    pub edges: Vec<usize>,
    /// Op codes along the path.
    pub ops: Vec<u8>,
    /// d_p: parameterised layers on the path.
    pub depth: usize,
}

/// A parsed cell together with its kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cell {
    pub kind: CellKind,
    pub dag: Dag,
}

/// P, effective depth and effective width of a cell (`docs/methods/connectivity.md` §3).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PathProxies {
    pub num_paths: usize,
    /// d_bar = (sum_p d_p) / P.
    pub d_bar: f64,
    /// m_bar = (sum_p 1[d_p > 0]) / d_bar; `None` when d_bar = 0 (no parameterised path).
    pub m_bar: Option<f64>,
}

impl Cell {
    pub fn parse(kind: CellKind, field: &str, topology: &str) -> Result<Self, ArchError> {
        Ok(Self {
            kind,
            dag: kind.parse(field, topology)?,
        })
    }

    /// Number of nodes, input and output included.
    pub fn nodes(&self) -> usize {
        self.dag.nodes()
    }

    /// The edge position of `source -> target` in string order.
    pub fn edge_position(&self, target: usize, source: usize) -> usize {
        target * (target - 1) / 2 + source
    }

    /// The digit form, `"2_02_002"`.
    pub fn digits(&self) -> String {
        self.dag.to_digits()
    }

    /// NAS-Bench-201's arch string `|nor_conv_3x3~0|+|...|` (only meaningful for NB201 cells).
    pub fn nb201_arch(&self) -> String {
        (1..self.nodes())
            .map(|t| {
                let edges: String = (0..t)
                    .map(|s| {
                        let name = NB201_OPS
                            .get(self.dag.op(t, s) as usize)
                            .copied()
                            .unwrap_or("none");
                        format!("{name}~{s}|")
                    })
                    .collect();
                format!("|{edges}")
            })
            .collect::<Vec<_>>()
            .join("+")
    }

    /// Every input->output path through existing (non-zero) edges, in lexicographic order of
    /// node sequences. More than [`MAX_PATHS`] is an error rather than an unbounded allocation.
    pub fn paths(&self) -> Result<Vec<CellPath>, ArchError> {
        if self.count_paths() > MAX_PATHS as u128 {
            return Err(ArchError::TooManyPaths {
                topology: self.digits(),
                limit: MAX_PATHS,
            });
        }
        let n = self.nodes();
        let mut out = Vec::new();
        let mut nodes = vec![0usize];
        let mut edges = Vec::new();
        let mut ops = Vec::new();
        self.walk(n - 1, &mut nodes, &mut edges, &mut ops, &mut out)?;
        Ok(out)
    }

    /// P by dynamic programming over nodes (saturating), without listing the paths.
    pub fn count_paths(&self) -> u128 {
        let n = self.nodes();
        let mut count = vec![0u128; n];
        count[0] = 1;
        for t in 1..n {
            count[t] = (0..t)
                .filter(|&s| self.dag.op(t, s) != 0)
                .fold(0u128, |acc, s| acc.saturating_add(count[s]));
        }
        count[n - 1]
    }

    fn walk(
        &self,
        last: usize,
        nodes: &mut Vec<usize>,
        edges: &mut Vec<usize>,
        ops: &mut Vec<u8>,
        out: &mut Vec<CellPath>,
    ) -> Result<(), ArchError> {
        let s = *nodes.last().unwrap_or(&0);
        if s == last {
            if out.len() >= MAX_PATHS {
                return Err(ArchError::TooManyPaths {
                    topology: self.digits(),
                    limit: MAX_PATHS,
                });
            }
            out.push(CellPath {
                nodes: nodes.clone(),
                edges: edges.clone(),
                ops: ops.clone(),
                depth: ops
                    .iter()
                    .filter(|&&op| self.kind.is_parameterised(op))
                    .count(),
            });
            return Ok(());
        }
        for t in s + 1..=last {
            let op = self.dag.op(t, s);
            if op == 0 {
                continue;
            }
            nodes.push(t);
            edges.push(self.edge_position(t, s));
            ops.push(op);
            self.walk(last, nodes, edges, ops, out)?;
            nodes.pop();
            edges.pop();
            ops.pop();
        }
        Ok(())
    }

    /// The paths, or [`ArchError::NoPath`] (naming the param `field`) when the cell is not a
    /// network.
    pub fn connected_paths(&self, field: &str, topology: &str) -> Result<Vec<CellPath>, ArchError> {
        let paths = self.paths()?;
        if paths.is_empty() {
            return Err(ArchError::NoPath {
                field: field.to_string(),
                topology: topology.to_string(),
            });
        }
        Ok(paths)
    }
}

/// `docs/methods/connectivity.md` §3: d_bar = sum_p d_p / P, m_bar = sum_p 1[d_p > 0] / d_bar.
/// `None` when there is no path (P = 0).
pub fn path_proxies(paths: &[CellPath]) -> Option<PathProxies> {
    if paths.is_empty() {
        return None;
    }
    let p = paths.len() as f64;
    let sum_d: usize = paths.iter().map(|q| q.depth).sum();
    let with_layers = paths.iter().filter(|q| q.depth > 0).count() as f64;
    let d_bar = sum_d as f64 / p;
    Some(PathProxies {
        num_paths: paths.len(),
        d_bar,
        m_bar: (d_bar > 0.0).then(|| with_layers / d_bar),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depths(kind: CellKind, topology: &str) -> Vec<usize> {
        let cell = Cell::parse(kind, "t", topology).unwrap();
        cell.paths().unwrap().iter().map(|p| p.depth).collect()
    }

    #[test]
    fn chain_has_one_path_of_three_layers() {
        // "2_02_002": 0 -lin-> 1 -lin-> 2 -lin-> 3, every other edge zero.
        let cell = Cell::parse(CellKind::Mlp, "t", "2_02_002").unwrap();
        let paths = cell.paths().unwrap();
        assert_eq!(paths.len(), 1);
        assert_eq!(paths[0].nodes, vec![0, 1, 2, 3]);
        // Positions in "2_02_002": (1,0)=0, (2,0)=1, (2,1)=2, (3,0)=3, (3,1)=4, (3,2)=5.
        assert_eq!(paths[0].edges, vec![0, 2, 5]);
        assert_eq!(paths[0].depth, 3);
    }

    #[test]
    fn parallel_and_mixed_cells_by_hand() {
        // "1_10_222": 0 -skip-> 1, 0 -skip-> 2, and 0, 1, 2 -lin-> 3: three paths of one layer.
        assert_eq!(depths(CellKind::Mlp, "1_10_222"), vec![1, 1, 1]);
        // "2_21_112" (`docs/methods/connectivity.md` §1): paths 0-1-2-3 (lin, skip, lin) = 2,
        // 0-1-3 (lin, skip) = 1, 0-2-3 (lin, lin) = 2, 0-3 (skip) = 0.
        let cell = Cell::parse(CellKind::Mlp, "t", "2_21_112").unwrap();
        let paths = cell.paths().unwrap();
        let got: Vec<(Vec<usize>, usize)> =
            paths.iter().map(|p| (p.nodes.clone(), p.depth)).collect();
        assert_eq!(
            got,
            vec![
                (vec![0, 1, 2, 3], 2),
                (vec![0, 1, 3], 1),
                (vec![0, 2, 3], 2),
                (vec![0, 3], 0),
            ]
        );
        let mut d: Vec<usize> = paths.iter().map(|p| p.depth).collect();
        d.sort();
        assert_eq!(d, vec![0, 1, 2, 2]);
    }

    #[test]
    fn nb201_counts_convs_not_pools() {
        // conv3x3 0->1, conv1x1 0->2, avgpool 1->2, skip 0->3, none 1->3, avgpool 2->3.
        let arch = "|nor_conv_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|skip_connect~0|none~1|avg_pool_3x3~2|";
        let cell = Cell::parse(CellKind::Nb201, "t", arch).unwrap();
        let got: Vec<(Vec<usize>, usize)> = cell
            .paths()
            .unwrap()
            .iter()
            .map(|p| (p.nodes.clone(), p.depth))
            .collect();
        assert_eq!(
            got,
            vec![(vec![0, 1, 2, 3], 1), (vec![0, 2, 3], 1), (vec![0, 3], 0)]
        );
        assert_eq!(cell.nb201_arch(), arch);
        assert_eq!(cell.digits(), "3_24_104");
    }

    #[test]
    fn dense_cell_path_count_and_disconnected_cell() {
        // Every edge present among n nodes: 2^(n-2) paths.
        assert_eq!(depths(CellKind::Mlp, "2_22_222_2222").len(), 8);
        // 20 dense nodes: 2^18 paths, refused before any is listed.
        let dense: Vec<String> = (1..20).map(|t| "2".repeat(t)).collect();
        let cell = Cell::parse(CellKind::Mlp, "t", &dense.join("_")).unwrap();
        assert_eq!(cell.count_paths(), 1 << 18);
        assert!(matches!(cell.paths(), Err(ArchError::TooManyPaths { .. })));
        let cell = Cell::parse(CellKind::Mlp, "t", "2_20_000").unwrap();
        assert!(cell.paths().unwrap().is_empty());
        let err = cell
            .connected_paths("topology", "2_20_000")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no input->output path"), "{err}");
    }

    #[test]
    fn proxies_by_hand() {
        // Mixed cell: d = 2, 1, 2, 0 -> d_bar = 5/4, m_bar = 3 / (5/4) = 2.4.
        let cell = Cell::parse(CellKind::Mlp, "t", "2_21_112").unwrap();
        let p = path_proxies(&cell.paths().unwrap()).unwrap();
        assert_eq!(p.num_paths, 4);
        assert!((p.d_bar - 1.25).abs() < 1e-12);
        assert!((p.m_bar.unwrap() - 2.4).abs() < 1e-12);
        // Only skip paths: d_bar = 0, m_bar undefined.
        let skip = Cell::parse(CellKind::Nb201, "t", "1_11_111").unwrap();
        let p = path_proxies(&skip.paths().unwrap()).unwrap();
        assert_eq!((p.num_paths, p.d_bar, p.m_bar), (4, 0.0, None));
        assert!(path_proxies(&[]).is_none());
    }
}
