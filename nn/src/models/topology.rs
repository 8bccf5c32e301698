//! Cell topologies: DAGs over nodes 0..=n, one op code per (target, source) edge
//! (`docs/methods/arch-aware.md` §1).

use crate::NnError;

/// A cell DAG. Node 0 is the input, node `n` the output; `ops[t - 1][s]` is the op code of the
/// edge from node `s` to node `t` (s < t), 0 meaning the edge does not exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dag {
    ops: Vec<Vec<u8>>,
}

/// The NAS-Bench-201 op names, indexed by their digit code.
pub const NB201_OPS: [&str; 5] = [
    "none",
    "skip_connect",
    "nor_conv_1x1",
    "nor_conv_3x3",
    "avg_pool_3x3",
];

impl Dag {
    /// Parses the `"2_02_002"` form: one `_`-separated group per target node `t = 1..`, group
    /// `t` holding `t` digits (sources `0..t`), each digit `<= max_op`.
    pub fn parse_digits(field: &str, s: &str, max_op: u8) -> Result<Self, NnError> {
        let groups: Vec<&str> = s.split('_').collect();
        let mut ops = Vec::with_capacity(groups.len());
        for (i, g) in groups.iter().enumerate() {
            if g.len() != i + 1 {
                return Err(NnError::spec(
                    field,
                    format!(
                        "topology {s:?}: group {} is {g:?} but must have {} digit(s), one per \
                         earlier node (e.g. \"2_02_002\")",
                        i + 1,
                        i + 1
                    ),
                ));
            }
            let mut row = Vec::with_capacity(g.len());
            for ch in g.chars() {
                match ch.to_digit(10) {
                    Some(d) if d as u8 <= max_op => row.push(d as u8),
                    _ => {
                        return Err(NnError::spec(
                            field,
                            format!("topology {s:?}: {ch:?} is not an op digit 0..={max_op}"),
                        ))
                    }
                }
            }
            ops.push(row);
        }
        Ok(Self { ops })
    }

    /// Parses a NAS-Bench-201 cell: the arch string
    /// `|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|...|`, the digit form
    /// `"3_33_133"`, or the six digits `"333133"` in the same edge order.
    pub fn parse_nb201(field: &str, s: &str) -> Result<Self, NnError> {
        let s = s.trim();
        if s.starts_with('|') {
            return Self::parse_nb201_arch(field, s);
        }
        if s.len() == 6 && s.chars().all(|c| c.is_ascii_digit()) {
            let spaced = format!("{}_{}_{}", &s[0..1], &s[1..3], &s[3..6]);
            return Self::parse_digits(field, &spaced, 4);
        }
        let dag = Self::parse_digits(field, s, 4)?;
        if dag.nodes() != 4 {
            return Err(NnError::spec(
                field,
                format!(
                    "a NAS-Bench-201 cell has 3 groups (4 nodes), {s:?} has {}",
                    dag.ops.len()
                ),
            ));
        }
        Ok(dag)
    }

    fn parse_nb201_arch(field: &str, s: &str) -> Result<Self, NnError> {
        let mut ops = Vec::new();
        for (t, group) in s.split('+').enumerate() {
            let g = group.trim();
            let inner = g
                .strip_prefix('|')
                .and_then(|g| g.strip_suffix('|'))
                .ok_or_else(|| {
                    NnError::spec(
                        field,
                        format!("arch string group {g:?} must look like |op~0|op~1|"),
                    )
                })?;
            let mut row = vec![0u8; t + 1];
            let mut seen = vec![false; t + 1];
            for edge in inner.split('|') {
                let (name, src) = edge.split_once('~').ok_or_else(|| {
                    NnError::spec(
                        field,
                        format!("arch string edge {edge:?} must be op~source"),
                    )
                })?;
                let code = NB201_OPS.iter().position(|o| *o == name).ok_or_else(|| {
                    NnError::spec(
                        field,
                        format!(
                            "unknown op {name:?}; expected one of {}",
                            NB201_OPS.join(", ")
                        ),
                    )
                })?;
                let src: usize = src.parse().ok().filter(|s| *s <= t).ok_or_else(|| {
                    NnError::spec(
                        field,
                        format!("edge {edge:?}: source must be a node 0..={t}"),
                    )
                })?;
                if seen[src] {
                    return Err(NnError::spec(
                        field,
                        format!("edge {edge:?}: source {src} given twice"),
                    ));
                }
                seen[src] = true;
                row[src] = code as u8;
            }
            if seen.iter().any(|s| !s) {
                return Err(NnError::spec(
                    field,
                    format!("arch string group {g:?} must name every source 0..={t}"),
                ));
            }
            ops.push(row);
        }
        if ops.len() != 3 {
            return Err(NnError::spec(
                field,
                format!("a NAS-Bench-201 cell has 3 groups, {s:?} has {}", ops.len()),
            ));
        }
        Ok(Self { ops })
    }

    /// Number of nodes including input and output.
    pub fn nodes(&self) -> usize {
        self.ops.len() + 1
    }

    /// Op code of the edge `source -> target` (0 when absent).
    pub fn op(&self, target: usize, source: usize) -> u8 {
        self.ops[target - 1][source]
    }

    /// Edges in string order `(position, target, source, op)`, absent ones included, so that
    /// `position` names an edge stably.
    pub fn edges(&self) -> impl Iterator<Item = (usize, usize, usize, u8)> + '_ {
        self.ops
            .iter()
            .enumerate()
            .flat_map(|(t, row)| row.iter().enumerate().map(move |(s, &op)| (t + 1, s, op)))
            .enumerate()
            .map(|(pos, (t, s, op))| (pos, t, s, op))
    }

    /// Number of existing incoming edges of `node` (the input node counts 1).
    pub fn in_degree(&self, node: usize) -> usize {
        if node == 0 {
            return 1;
        }
        self.ops[node - 1].iter().filter(|&&op| op != 0).count()
    }

    /// Whether some chain of existing edges leads from the input to the output.
    pub fn connects_input_to_output(&self) -> bool {
        let mut reach = vec![false; self.nodes()];
        reach[0] = true;
        for t in 1..self.nodes() {
            reach[t] = (0..t).any(|s| reach[s] && self.op(t, s) != 0);
        }
        reach[self.nodes() - 1]
    }

    /// The digit form, e.g. `"2_02_002"`.
    pub fn to_digits(&self) -> String {
        self.ops
            .iter()
            .map(|row| row.iter().map(|d| char::from(b'0' + d)).collect::<String>())
            .collect::<Vec<_>>()
            .join("_")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_digit_topologies() {
        let d = Dag::parse_digits("t", "2_02_002", 2).unwrap();
        assert_eq!(d.nodes(), 4);
        assert_eq!(
            (d.op(1, 0), d.op(2, 0), d.op(2, 1), d.op(3, 2)),
            (2, 0, 2, 2)
        );
        assert_eq!(d.in_degree(3), 1);
        assert!(d.connects_input_to_output());
        assert_eq!(d.to_digits(), "2_02_002");
        let positions: Vec<(usize, usize, usize)> =
            d.edges().map(|(p, t, s, _)| (p, t, s)).collect();
        assert_eq!(positions[4], (4, 3, 1));
        assert!(!Dag::parse_digits("t", "2_00_000", 2)
            .unwrap()
            .connects_input_to_output());
        for bad in ["2_2", "3_02", "2__", "", "a"] {
            assert!(Dag::parse_digits("t", bad, 2).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nb201_forms_agree() {
        let arch = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|none~1|avg_pool_3x3~2|";
        let a = Dag::parse_nb201("c", arch).unwrap();
        let b = Dag::parse_nb201("c", "3_32_104").unwrap();
        let c = Dag::parse_nb201("c", "332104").unwrap();
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert!(Dag::parse_nb201("c", "|conv~0|+|none~0|none~1|+|none~0|none~1|none~2|").is_err());
        assert!(Dag::parse_nb201("c", "|none~0|+|none~0|+|none~0|none~1|none~2|").is_err());
        assert!(Dag::parse_nb201("c", "3_33").is_err());
        assert!(Dag::parse_nb201("c", "3_35_111").is_err());
    }
}
