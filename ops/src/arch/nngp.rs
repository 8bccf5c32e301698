//! The NNGP kernel of a wide ReLU network built from a DAG cell, and the bounds on its smallest
//! eigenvalue (`docs/methods/connectivity.md` §1).
//!
//! Which network the recursion describes: every node's kernel is the sum of its incoming edges'
//! kernels with no cross terms. That is exact in the infinite-width limit when each
//! parameterised edge ends in a fresh zero-mean weight matrix, i.e. the pre-activation form
//! `sqrt(2/m) W ReLU(z)` (ReLU-Conv-BN order, as in NAS-Bench-201) behind a Gaussian stem, and
//! for any form along a single chain. With the post-activation form `sqrt(2/m) ReLU(W z)` two
//! branches meeting at a node are correlated through E[ReLU] > 0, which the paper's recursion (and
//! hence its worked examples) leaves out. Conv edges are treated as the fully-connected map f,
//! skip and average pooling as identity (§3 counts them the same way).

use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

use super::paths::{Cell, CellPath};
use super::ArchError;

/// Largest batch for which the kernel and its exact eigenvalues are computed (Jacobi is O(n^3)).
pub const MAX_BATCH: usize = 256;
/// Largest input dimension drawn (the inputs only set the input kernel).
pub const MAX_DIM: usize = 1 << 14;

/// A symmetric n x n per-sample kernel, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Gram {
    n: usize,
    data: Vec<f64>,
}

impl Gram {
    pub fn zeros(n: usize) -> Self {
        Self {
            n,
            data: vec![0.0; n * n],
        }
    }

    /// K_ij = <x_i, x_j> over the rows of `xs` (all of one length).
    pub fn of_rows(xs: &[Vec<f64>]) -> Self {
        let n = xs.len();
        let mut k = Self::zeros(n);
        for i in 0..n {
            for j in 0..=i {
                let v: f64 = xs[i].iter().zip(&xs[j]).map(|(a, b)| a * b).sum();
                k.set(i, j, v);
            }
        }
        k
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.n + j]
    }

    /// Sets K_ij and K_ji.
    pub fn set(&mut self, i: usize, j: usize, v: f64) {
        self.data[i * self.n + j] = v;
        self.data[j * self.n + i] = v;
    }

    fn add_assign(&mut self, other: &Gram) {
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += b;
        }
    }

    /// Rows as nested vectors (for JSON artifacts).
    pub fn rows(&self) -> Vec<Vec<f64>> {
        self.data
            .chunks(self.n.max(1))
            .map(|r| r.to_vec())
            .collect()
    }
}

/// `docs/methods/connectivity.md` §1: h(C) = (2 C arcsin(C) + 2 sqrt(1 - C^2) + pi C) / (2 pi), the
/// ReLU arc-cosine map of a correlation C in [-1, 1] (clamped against rounding); h(1) = 1.
pub fn relu_arccos(c: f64) -> f64 {
    let c = c.clamp(-1.0, 1.0);
    let pi = std::f64::consts::PI;
    (2.0 * c * c.asin() + 2.0 * (1.0 - c * c).max(0.0).sqrt() + pi * c) / (2.0 * pi)
}

/// `docs/methods/connectivity.md` §1: f(K)_ij = h(K_ij / sqrt(K_ii K_jj)) sqrt(K_ii K_jj), diagonal
/// preserved. A zero diagonal (a node without inputs) maps to zero.
pub fn relu_map(k: &Gram) -> Gram {
    let mut out = k.clone();
    for i in 0..k.n {
        for j in 0..i {
            let scale = (k.get(i, i) * k.get(j, j)).max(0.0).sqrt();
            let v = if scale > 0.0 {
                relu_arccos(k.get(i, j) / scale) * scale
            } else {
                0.0
            };
            out.set(i, j, v);
        }
    }
    out
}

/// `docs/methods/connectivity.md` §1: f^d applied to a unit-diagonal entry K_ij (f^0 = identity).
pub fn relu_map_iter(k_ij: f64, depth: usize) -> f64 {
    (0..depth).fold(k_ij, |c, _| relu_arccos(c))
}

/// `docs/methods/connectivity.md` §1: K(0) = input kernel; K(t) = sum over existing edges (s, t)
/// of K(s) (skip, pooling) or f(K(s)) (parameterised). Returns the kernel of every node.
pub fn propagate(cell: &Cell, input: &Gram) -> Vec<Gram> {
    let n = cell.nodes();
    let mut kernels = vec![input.clone()];
    for t in 1..n {
        let mut acc = Gram::zeros(input.n);
        for (s, ks) in kernels.iter().enumerate() {
            let op = cell.dag.op(t, s);
            if op == 0 {
                continue;
            }
            if cell.kind.is_parameterised(op) {
                acc.add_assign(&relu_map(ks));
            } else {
                acc.add_assign(ks);
            }
        }
        kernels.push(acc);
    }
    kernels
}

/// `docs/methods/connectivity.md` §1: lambda_min(K_out) <= min over i != j of
/// [P - sum_p f^{d_p}(K_ij)], with K the unit-diagonal input kernel. `None` below two samples.
pub fn path_bound(paths: &[CellPath], input: &Gram) -> Option<f64> {
    let mut best: Option<f64> = None;
    let p = paths.len() as f64;
    for i in 0..input.n {
        for j in 0..i {
            let k = input.get(i, j);
            let v = p - paths.iter().map(|q| relu_map_iter(k, q.depth)).sum::<f64>();
            best = Some(best.map_or(v, |b: f64| b.min(v)));
        }
    }
    best
}

/// `docs/methods/connectivity.md` §1, the 2x2 principal-submatrix bound on a computed kernel:
/// min over i != j of
/// lambda_min([[K_ii, K_ij], [K_ij, K_jj]]) = (a + d) / 2 - sqrt(((a - d) / 2)^2 + b^2).
pub fn pairwise_bound(k: &Gram) -> Option<f64> {
    let mut best: Option<f64> = None;
    for i in 0..k.n {
        for j in 0..i {
            let (a, d, b) = (k.get(i, i), k.get(j, j), k.get(i, j));
            let v = (a + d) / 2.0 - (((a - d) / 2.0).powi(2) + b * b).sqrt();
            best = Some(best.map_or(v, |x: f64| x.min(v)));
        }
    }
    best
}

/// Eigenvalues of a symmetric matrix, ascending, by cyclic Jacobi rotations (Numerical Recipes
/// §11.1); converges to machine precision in O(10) sweeps for the sizes used here.
pub fn symmetric_eigenvalues(k: &Gram) -> Vec<f64> {
    let n = k.n;
    let mut a = k.data.clone();
    let total: f64 = a.iter().map(|v| v * v).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        if off <= 1e-30 * total.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = if theta == 0.0 {
                    1.0
                } else {
                    theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt())
                };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..n {
                    let (arp, arq) = (a[r * n + p], a[r * n + q]);
                    a[r * n + p] = c * arp - s * arq;
                    a[r * n + q] = s * arp + c * arq;
                }
                for r in 0..n {
                    let (apr, aqr) = (a[p * n + r], a[q * n + r]);
                    a[p * n + r] = c * apr - s * aqr;
                    a[q * n + r] = s * apr + c * aqr;
                }
            }
        }
    }
    let mut eig: Vec<f64> = (0..n).map(|i| a[i * n + i]).collect();
    eig.sort_by(f64::total_cmp);
    eig
}

/// Checks a batch size and input dimension against [`MAX_BATCH`] and [`MAX_DIM`].
pub fn check_input_shape(batch: usize, dim: usize) -> Result<(), ArchError> {
    if !(2..=MAX_BATCH).contains(&batch) {
        return Err(ArchError::invalid(
            "batch",
            format!("{batch} is outside 2..={MAX_BATCH} (the bound needs two samples)"),
        ));
    }
    if !(1..=MAX_DIM).contains(&dim) {
        return Err(ArchError::invalid(
            "dim",
            format!("{dim} is outside 1..={MAX_DIM}"),
        ));
    }
    Ok(())
}

/// `batch` inputs x ~ N(0, I_dim), each scaled to unit norm (so K_ii = 1, §1).
pub fn normalised_inputs(batch: usize, dim: usize, seed: u64) -> Result<Vec<Vec<f64>>, ArchError> {
    check_input_shape(batch, dim)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut xs = Vec::with_capacity(batch);
    while xs.len() < batch {
        let x: Vec<f64> = (0..dim).map(|_| StandardNormal.sample(&mut rng)).collect();
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 1e-12 {
            xs.push(x.into_iter().map(|v| v / norm).collect());
        }
    }
    Ok(xs)
}

/// Summary of an output kernel and its eigenvalue bounds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KernelStats {
    pub diag_mean: f64,
    pub offdiag_mean: f64,
    pub offdiag_min: f64,
    pub offdiag_max: f64,
    /// Exact smallest eigenvalue of K_out.
    pub lambda_min: f64,
    /// min over 2x2 principal submatrices of K_out (an upper bound on lambda_min).
    pub lambda_min_pairwise: f64,
    /// The paper's path formula (§1), min over i != j of [P - sum_p f^{d_p}(K_ij)].
    pub lambda_min_bound: f64,
}

/// Output kernel statistics for a cell on the unit-norm inputs `xs` (at least two).
pub fn kernel_stats(
    cell: &Cell,
    paths: &[CellPath],
    input: &Gram,
) -> Result<(Gram, KernelStats), ArchError> {
    let n = input.len();
    if n < 2 {
        return Err(ArchError::invalid(
            "batch",
            "at least two samples are needed for off-diagonal statistics",
        ));
    }
    let out = propagate(cell, input)
        .pop()
        .unwrap_or_else(|| input.clone());
    let diag_mean = (0..n).map(|i| out.get(i, i)).sum::<f64>() / n as f64;
    let off: Vec<f64> = (0..n)
        .flat_map(|i| (0..i).map(move |j| (i, j)))
        .map(|(i, j)| out.get(i, j))
        .collect();
    let offdiag_mean = off.iter().sum::<f64>() / off.len() as f64;
    let offdiag_min = off.iter().copied().fold(f64::INFINITY, f64::min);
    let offdiag_max = off.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lambda_min = symmetric_eigenvalues(&out)
        .first()
        .copied()
        .unwrap_or(f64::NAN);
    let stats = KernelStats {
        diag_mean,
        offdiag_mean,
        offdiag_min,
        offdiag_max,
        lambda_min,
        lambda_min_pairwise: pairwise_bound(&out).unwrap_or(f64::NAN),
        lambda_min_bound: path_bound(paths, input).unwrap_or(f64::NAN),
    };
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::paths::CellKind;

    fn cell(t: &str) -> Cell {
        Cell::parse(CellKind::Mlp, "t", t).unwrap()
    }

    fn two_point(k: f64) -> Gram {
        let mut g = Gram::zeros(2);
        g.set(0, 0, 1.0);
        g.set(1, 1, 1.0);
        g.set(0, 1, k);
        g
    }

    #[test]
    fn arccos_map_values() {
        let pi = std::f64::consts::PI;
        assert!((relu_arccos(1.0) - 1.0).abs() < 1e-15);
        // h(0) = 2 / (2 pi) = 1 / pi; h(-1) = (2 (-1)(-pi/2) - pi) / (2 pi) = 0.
        assert!((relu_arccos(0.0) - 1.0 / pi).abs() < 1e-15);
        assert!(relu_arccos(-1.0).abs() < 1e-15);
        // Monotone increasing and above the identity on (-1, 1).
        let mut last = -1.0;
        for i in 1..200 {
            let c = -1.0 + i as f64 / 100.0;
            let h = relu_arccos(c);
            assert!(h > last && h >= c - 1e-15, "h({c}) = {h}");
            last = h;
        }
        // Homogeneity of f: scaling the kernel scales the output.
        let mut g = two_point(0.3);
        g.set(0, 0, 4.0);
        let f = relu_map(&g);
        assert!((f.get(0, 1) - 2.0 * relu_arccos(0.3 / 2.0)).abs() < 1e-15);
        assert_eq!(f.get(0, 0), 4.0);
    }

    #[test]
    fn worked_example_bounds() {
        // `docs/methods/connectivity.md` §1, three linear edges each: chain 1 - f^3(K), parallel
        // 3 (1 - f(K)), mixed "2_21_112" 4 - K - f(K) - 2 f^2(K). The recursion's K_out is
        // [[P, o], [o, P]], so its 2x2 bound P - o equals the path formula here.
        let f = relu_arccos;
        for k in [-0.6, 0.0, 0.25, 0.9] {
            let input = two_point(k);
            let cases = [
                ("2_02_002", 1.0 - f(f(f(k)))),
                ("1_10_222", 3.0 * (1.0 - f(k))),
                ("2_21_112", 4.0 - k - f(k) - 2.0 * f(f(k))),
            ];
            for (t, want) in cases {
                let c = cell(t);
                let paths = c.paths().unwrap();
                let bound = path_bound(&paths, &input).unwrap();
                assert!((bound - want).abs() < 1e-12, "{t} K={k}: {bound} vs {want}");
                let (out, stats) = kernel_stats(&c, &paths, &input).unwrap();
                assert!((out.get(0, 0) - paths.len() as f64).abs() < 1e-12);
                assert!((stats.lambda_min_pairwise - want).abs() < 1e-12, "{t}");
                assert!((stats.lambda_min - want).abs() < 1e-9, "{t}");
            }
        }
        // The paper's ordering chain < parallel < mixed at a typical correlation.
        let input = two_point(0.5);
        let b: Vec<f64> = ["2_02_002", "1_10_222", "2_21_112"]
            .iter()
            .map(|t| path_bound(&cell(t).paths().unwrap(), &input).unwrap())
            .collect();
        assert!(b[0] < b[1] && b[1] < b[2], "{b:?}");
    }

    #[test]
    fn jacobi_eigenvalues() {
        let mut g = Gram::zeros(3);
        for i in 0..3 {
            g.set(i, i, 2.0);
        }
        g.set(0, 1, -1.0);
        g.set(1, 2, -1.0);
        let e = symmetric_eigenvalues(&g);
        let r2 = 2f64.sqrt();
        for (a, b) in e.iter().zip([2.0 - r2, 2.0, 2.0 + r2]) {
            assert!((a - b).abs() < 1e-12, "{e:?}");
        }
        // A Gram matrix of 6 vectors in 3 dimensions has three zero eigenvalues.
        let xs = normalised_inputs(6, 3, 1).unwrap();
        let e = symmetric_eigenvalues(&Gram::of_rows(&xs));
        assert!(e[..3].iter().all(|v| v.abs() < 1e-12), "{e:?}");
        assert!((e.iter().sum::<f64>() - 6.0).abs() < 1e-12);
    }

    /// Lower Cholesky factor of a b x b Gram matrix (row-major); a non-positive pivot (a
    /// rank-deficient Gram) gives a zero column, which keeps L L^T equal to the input.
    fn cholesky(g: &Gram) -> Vec<f64> {
        let b = g.len();
        let mut l = vec![0.0; b * b];
        for i in 0..b {
            for j in 0..=i {
                let s: f64 = (0..j).map(|k| l[i * b + k] * l[j * b + k]).sum();
                if i == j {
                    l[i * b + i] = (g.get(i, i) - s).max(0.0).sqrt();
                } else if l[j * b + j] > 0.0 {
                    l[i * b + j] = (g.get(i, j) - s) / l[j * b + j];
                }
            }
        }
        l
    }

    /// `m` rows of `scale * W a` for W ~ N(0, I): row k is N(0, scale^2 Gram(a)) over the batch,
    /// drawn as scale * L g_k with L the Cholesky factor of Gram(a). The same distribution as
    /// multiplying by an m x m Gaussian matrix, at O(m b^2) instead of O(m^2 b) cost.
    fn gaussian_layer(gram: &Gram, m: usize, scale: f64, rng: &mut StdRng) -> Vec<Vec<f64>> {
        let b = gram.len();
        let l = cholesky(gram);
        let mut out = vec![Vec::with_capacity(m); b];
        let mut g = vec![0.0; b];
        for _ in 0..m {
            for v in g.iter_mut() {
                *v = StandardNormal.sample(rng);
            }
            for (i, row) in out.iter_mut().enumerate() {
                row.push(scale * (0..=i).map(|j| l[i * b + j] * g[j]).sum::<f64>());
            }
        }
        out
    }

    /// A direct draw of the network the recursion describes, `m` wide: a Gaussian stem
    /// z0 = W0 x / sqrt(m) with W0 ~ N(0, 1), then per parameterised edge sqrt(2/m) W ReLU(z)
    /// with a fresh W ~ N(0, 1), skips as identity, and node values summed as vectors (so any
    /// cross terms between branches are in the estimate).
    fn monte_carlo_kernel(c: &Cell, xs: &[Vec<f64>], m: usize, seed: u64) -> Gram {
        let mut rng = StdRng::seed_from_u64(seed);
        let b = xs.len();
        let stem = gaussian_layer(&Gram::of_rows(xs), m, 1.0 / (m as f64).sqrt(), &mut rng);
        let mut nodes = vec![stem];
        let scale = (2.0 / m as f64).sqrt();
        for t in 1..c.nodes() {
            let mut acc = vec![vec![0.0; m]; b];
            for (s, z) in nodes.iter().enumerate() {
                let op = c.dag.op(t, s);
                if op == 0 {
                    continue;
                }
                let contribution = if c.kind.is_parameterised(op) {
                    let relu: Vec<Vec<f64>> = z
                        .iter()
                        .map(|row| row.iter().map(|v| v.max(0.0)).collect())
                        .collect();
                    gaussian_layer(&Gram::of_rows(&relu), m, scale, &mut rng)
                } else {
                    z.clone()
                };
                for (a, row) in acc.iter_mut().zip(&contribution) {
                    for (x, y) in a.iter_mut().zip(row) {
                        *x += y;
                    }
                }
            }
            nodes.push(acc);
        }
        Gram::of_rows(&nodes[c.nodes() - 1])
    }

    #[test]
    fn recursion_matches_a_wide_random_network() {
        // "2_12_002" makes f act on a sum of differently correlated kernels (K + f(K)), where
        // the recursion and the path formula differ; "2_21_112" is the paper's mixed cell.
        // At width 200,000 the draw's relative error is about 1%; tolerance 5% of the diagonal
        // on every entry, 0.02 on every correlation.
        let xs = normalised_inputs(4, 3, 11).unwrap();
        let input = Gram::of_rows(&xs);
        for (t, seed) in [("2_12_002", 5), ("2_21_112", 6)] {
            let c = cell(t);
            let want = propagate(&c, &input).pop().unwrap();
            let got = monte_carlo_kernel(&c, &xs, 200_000, seed);
            let scale = (0..4).map(|i| want.get(i, i)).fold(0.0, f64::max);
            let corr =
                |g: &Gram, i: usize, j: usize| g.get(i, j) / (g.get(i, i) * g.get(j, j)).sqrt();
            for i in 0..4 {
                for j in 0..=i {
                    let err = (got.get(i, j) - want.get(i, j)).abs() / scale;
                    assert!(
                        err < 0.05,
                        "{t} K[{i}][{j}]: mc {} vs recursion {} ({err:.3})",
                        got.get(i, j),
                        want.get(i, j)
                    );
                    let cerr = (corr(&got, i, j) - corr(&want, i, j)).abs();
                    assert!(cerr < 0.02, "{t} C[{i}][{j}] off by {cerr:.4}");
                }
            }
        }
    }

    #[test]
    fn inputs_are_unit_norm_and_validated() {
        let xs = normalised_inputs(5, 7, 3).unwrap();
        let g = Gram::of_rows(&xs);
        assert!((0..5).all(|i| (g.get(i, i) - 1.0).abs() < 1e-12));
        assert_eq!(xs, normalised_inputs(5, 7, 3).unwrap());
        assert!(normalised_inputs(1, 7, 3).is_err());
        assert!(normalised_inputs(4, 0, 3).is_err());
        assert!(normalised_inputs(4, MAX_DIM + 1, 3).is_err());
    }
}
