//! The NAS-Bench-201 cell space (`docs/methods/training-free-nas.md` §1) as search states:
//! single architectures ([`Arch`]) and supernets with a set of ops per edge ([`OpSets`]).

use rand::Rng;

use crate::arch::filter::AcceptanceBox;
use crate::arch::paths::path_proxies;
use crate::arch::{Cell, CellKind};
use nn::models::topology::NB201_OPS;
use nn::models::Dag;

/// Edges of a cell, in arch-string order: (1<-0), (2<-0), (2<-1), (3<-0), (3<-1), (3<-2).
pub const NUM_EDGES: usize = 6;
/// Ops per edge: 0 none, 1 skip, 2 conv1x1, 3 conv3x3, 4 avgpool3x3.
pub const NUM_OPS: usize = 5;
/// `(target, source)` of each edge position.
pub const EDGE_NODES: [(usize, usize); NUM_EDGES] =
    [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)];

/// One NAS-Bench-201 cell: the op code of each edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Arch(pub [u8; NUM_EDGES]);

impl Arch {
    /// Parses an arch string, `"3_33_133"` or `"333133"`.
    pub fn parse(field: &str, s: &str) -> Result<Self, nn::NnError> {
        let dag = Dag::parse_nb201(field, s)?;
        let mut ops = [0u8; NUM_EDGES];
        for (pos, _, _, op) in dag.edges() {
            if let Some(slot) = ops.get_mut(pos) {
                *slot = op;
            }
        }
        Ok(Self(ops))
    }

    /// The digit form `"3_33_133"`.
    pub fn digits(&self) -> String {
        let d: Vec<char> = self.0.iter().map(|o| char::from(b'0' + o)).collect();
        format!("{}_{}{}_{}{}{}", d[0], d[1], d[2], d[3], d[4], d[5])
    }

    /// NAS-Bench-201's `|nor_conv_3x3~0|+|...|`.
    pub fn arch_string(&self) -> String {
        let name = |pos: usize| {
            NB201_OPS
                .get(self.0[pos] as usize)
                .copied()
                .unwrap_or("none")
        };
        let group = |t: usize| {
            let edges: String = EDGE_NODES
                .iter()
                .enumerate()
                .filter(|(_, (tt, _))| *tt == t)
                .map(|(pos, (_, s))| format!("{}~{s}|", name(pos)))
                .collect();
            format!("|{edges}")
        };
        (1..=3).map(group).collect::<Vec<_>>().join("+")
    }

    /// Uniform over the 5^6 cells.
    pub fn random(rng: &mut impl Rng) -> Self {
        let mut ops = [0u8; NUM_EDGES];
        for o in &mut ops {
            *o = rng.gen_range(0..NUM_OPS as u8);
        }
        Self(ops)
    }

    /// `docs/methods/training-free-nas.md` §4: one mutation changes one edge's op to a different
    /// op.
    pub fn mutate(&self, rng: &mut impl Rng) -> Self {
        let mut ops = self.0;
        let e = rng.gen_range(0..NUM_EDGES);
        let shift = rng.gen_range(1..NUM_OPS as u8);
        ops[e] = (ops[e] + shift) % NUM_OPS as u8;
        Self(ops)
    }

    /// The supernet holding exactly this cell.
    pub fn op_sets(&self) -> OpSets {
        let mut m = [0u8; NUM_EDGES];
        for (slot, op) in m.iter_mut().zip(self.0) {
            *slot = 1 << op;
        }
        OpSets(m)
    }

    /// The arch-package view, for path proxies.
    fn cell(&self) -> Result<Cell, crate::arch::ArchError> {
        Cell::parse(CellKind::Nb201, "arch", &self.digits())
    }
}

/// A supernet: bit k of `self.0[e]` set means op k sits on edge e (mixed by equal weights).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpSets(pub [u8; NUM_EDGES]);

impl OpSets {
    /// Every op on every edge.
    pub fn full() -> Self {
        Self([(1 << NUM_OPS) - 1; NUM_EDGES])
    }

    /// Every op but `none` on every edge: TE-NAS's starting supernet. The reference
    /// (VITA-Group/TENAS `prune_tenas.py`) sets the `none` logit to -inf before pruning, so
    /// `none` is never mixed in, never a pruning candidate, and never kept.
    pub fn full_without_none() -> Self {
        Self([((1 << NUM_OPS) - 1) & !1; NUM_EDGES])
    }

    pub fn ops(&self, edge: usize) -> impl Iterator<Item = u8> + '_ {
        let mask = self.0[edge];
        (0..NUM_OPS as u8).filter(move |k| mask & (1 << k) != 0)
    }

    pub fn count(&self, edge: usize) -> usize {
        self.0[edge].count_ones() as usize
    }

    pub fn without(&self, edge: usize, op: u8) -> Self {
        let mut m = self.0;
        m[edge] &= !(1 << op);
        Self(m)
    }

    /// The single cell, when every edge holds exactly one op.
    pub fn single(&self) -> Option<Arch> {
        let mut ops = [0u8; NUM_EDGES];
        for (e, slot) in ops.iter_mut().enumerate() {
            if self.count(e) != 1 {
                return None;
            }
            *slot = self.0[e].trailing_zeros() as u8;
        }
        Some(Arch(ops))
    }

    /// `"01234/01234/..."`: the op digits of each edge; a single cell reads like `3/3/3/1/3/3`.
    pub fn label(&self) -> String {
        (0..NUM_EDGES)
            .map(|e| {
                self.ops(e)
                    .map(|o| char::from(b'0' + o))
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// Which cells a search may visit: the whole space or those a connectivity filter accepts
/// (`docs/methods/connectivity.md` §3, via `crate::arch::filter`).
#[derive(Clone, Debug)]
pub enum Space {
    All,
    Accepted {
        /// The accepted cells, in digit order.
        cells: Vec<Arch>,
        acceptance: AcceptanceBox,
    },
}

/// How many tries a filtered sampler or mutation makes before giving up on a draw.
const MAX_TRIES: usize = 1000;

impl Space {
    /// The space filtered by `acceptance` (the whole NB201 space is enumerated: 15,625 cells).
    pub fn filtered(acceptance: AcceptanceBox) -> Result<Self, crate::arch::ArchError> {
        let mut cells = Vec::new();
        for code in 0..(NUM_OPS as u32).pow(NUM_EDGES as u32) {
            let mut ops = [0u8; NUM_EDGES];
            let mut c = code;
            for slot in ops.iter_mut().rev() {
                *slot = (c % NUM_OPS as u32) as u8;
                c /= NUM_OPS as u32;
            }
            let arch = Arch(ops);
            if let Some(p) = path_proxies(&arch.cell()?.paths()?) {
                if acceptance.accepts(&p) {
                    cells.push(arch);
                }
            }
        }
        Ok(Self::Accepted { cells, acceptance })
    }

    /// The box computed from the whole space (`docs/methods/connectivity.md` §3).
    pub fn space_box() -> Result<AcceptanceBox, crate::arch::ArchError> {
        let cells = crate::arch::filter::nb201_space()?;
        let mut proxies = Vec::with_capacity(cells.len());
        for c in &cells {
            proxies.extend(path_proxies(&c.paths()?));
        }
        AcceptanceBox::from_space(proxies.iter()).ok_or_else(|| {
            crate::arch::ArchError::invalid(
                "filter",
                "no cell of the space has a parameterised path",
            )
        })
    }

    pub fn size(&self) -> usize {
        match self {
            Space::All => NUM_OPS.pow(NUM_EDGES as u32),
            Space::Accepted { cells, .. } => cells.len(),
        }
    }

    pub fn accepts(&self, arch: &Arch) -> bool {
        match self {
            Space::All => true,
            Space::Accepted { cells, .. } => cells.binary_search(arch).is_ok(),
        }
    }

    /// A uniform draw from the space; `None` only for an empty filtered space.
    pub fn sample(&self, rng: &mut impl Rng) -> Option<Arch> {
        match self {
            Space::All => Some(Arch::random(rng)),
            Space::Accepted { cells, .. } => {
                (!cells.is_empty()).then(|| cells[rng.gen_range(0..cells.len())])
            }
        }
    }

    /// A one-edge mutation that the space accepts; after `MAX_TRIES` rejected mutations, a
    /// fresh draw from the space (a parent whose every neighbour is filtered out).
    pub fn mutate(&self, arch: &Arch, rng: &mut impl Rng) -> Option<Arch> {
        for _ in 0..MAX_TRIES {
            let child = arch.mutate(rng);
            if self.accepts(&child) {
                return Some(child);
            }
        }
        self.sample(rng)
    }

    /// Draws from `draw` until the space accepts the result (at most `MAX_TRIES` times).
    pub fn rejection_sample(&self, mut draw: impl FnMut() -> Arch) -> Option<Arch> {
        (0..MAX_TRIES).map(|_| draw()).find(|a| self.accepts(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn arch_forms_round_trip() {
        let a = Arch::parse("a", "3_32_104").unwrap();
        assert_eq!(a.0, [3, 3, 2, 1, 0, 4]);
        assert_eq!(a.digits(), "3_32_104");
        assert_eq!(
            a.arch_string(),
            "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_1x1~1|+|skip_connect~0|none~1|avg_pool_3x3~2|"
        );
        assert_eq!(Arch::parse("a", &a.arch_string()).unwrap(), a);
        assert_eq!(a.op_sets().single(), Some(a));
        assert_eq!(OpSets::full().single(), None);
        assert_eq!(OpSets::full().without(2, 4).count(2), 4);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let m = a.mutate(&mut rng);
            assert_eq!(m.0.iter().zip(a.0).filter(|(x, y)| **x != *y).count(), 1);
        }
    }
}
