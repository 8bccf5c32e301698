//! Small dense symmetric linear algebra for the indicators (row-major n x n, f64).

use crate::arch::nngp::{symmetric_eigenvalues, Gram};

/// Pivots below this fraction of the largest diagonal entry count as zero: a kernel that
/// singular is not resolved in f64 (rounding is about n * eps * ||K||).
pub const SINGULAR_RTOL: f64 = 1e-12;

/// K = A A^T over the rows of `a` (all of one length).
pub fn gram(a: &[Vec<f64>]) -> Vec<f64> {
    cross(a, a)
}

/// K[i][j] = <a_i, b_j>, an `a.len() x b.len()` matrix.
pub fn cross(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<f64> {
    let mut k = vec![0.0; a.len() * b.len()];
    for (i, ai) in a.iter().enumerate() {
        for (j, bj) in b.iter().enumerate() {
            k[i * b.len() + j] = ai.iter().zip(bj).map(|(x, y)| x * y).sum();
        }
    }
    k
}

/// Eigenvalues, ascending, of the symmetric `k` (n x n): the Jacobi solver of `arch::nngp`.
pub fn eigenvalues(k: &[f64], n: usize) -> Vec<f64> {
    let mut g = Gram::zeros(n);
    for i in 0..n {
        for j in 0..=i {
            g.set(i, j, 0.5 * (k[i * n + j] + k[j * n + i]));
        }
    }
    symmetric_eigenvalues(&g)
}

/// Lower Cholesky factor L (K = L L^T) of the symmetric `k`, or `None` when a pivot is not
/// above `SINGULAR_RTOL` times the largest diagonal entry (singular or indefinite).
pub fn cholesky(k: &[f64], n: usize) -> Option<Vec<f64>> {
    let scale = (0..n).map(|i| k[i * n + i]).fold(0.0f64, f64::max);
    if !(scale.is_finite() && scale > 0.0) {
        return None;
    }
    let mut l = vec![0.0f64; n * n];
    for j in 0..n {
        let d = k[j * n + j] - (0..j).map(|p| l[j * n + p].powi(2)).sum::<f64>();
        let positive = d > SINGULAR_RTOL * scale;
        if !positive {
            return None;
        }
        let d = d.sqrt();
        l[j * n + j] = d;
        for i in j + 1..n {
            let s = k[i * n + j] - (0..j).map(|p| l[i * n + p] * l[j * n + p]).sum::<f64>();
            l[i * n + j] = s / d;
        }
    }
    Some(l)
}

/// Solves K X = B for X (`b` is n x m, row-major) given K's Cholesky factor.
pub fn cholesky_solve(l: &[f64], n: usize, b: &[f64], m: usize) -> Vec<f64> {
    let mut x = b.to_vec();
    for c in 0..m {
        // L y = b, then L^T x = y.
        for i in 0..n {
            let s: f64 = (0..i).map(|p| l[i * n + p] * x[p * m + c]).sum();
            x[i * m + c] = (x[i * m + c] - s) / l[i * n + i];
        }
        for i in (0..n).rev() {
            let s: f64 = (i + 1..n).map(|p| l[p * n + i] * x[p * m + c]).sum();
            x[i * m + c] = (x[i * m + c] - s) / l[i * n + i];
        }
    }
    x
}

/// log det K = 2 sum log L_ii.
pub fn cholesky_logdet(l: &[f64], n: usize) -> f64 {
    (0..n).map(|i| l[i * n + i].ln()).sum::<f64>() * 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_and_logdet_match_a_known_matrix() {
        // K = [[4, 2], [2, 3]]: det 8, K^-1 [1, 1] = [1/8, 2/8].
        let k = [4.0, 2.0, 2.0, 3.0];
        let l = cholesky(&k, 2).unwrap();
        assert!((cholesky_logdet(&l, 2) - 8f64.ln()).abs() < 1e-12);
        let x = cholesky_solve(&l, 2, &[1.0, 1.0], 1);
        assert!((x[0] - 0.125).abs() < 1e-12 && (x[1] - 0.25).abs() < 1e-12);
        assert!(cholesky(&[1.0, 1.0, 1.0, 1.0], 2).is_none());
        let e = eigenvalues(&k, 2);
        assert!((e[0] * e[1] - 8.0).abs() < 1e-9 && (e[0] + e[1] - 7.0).abs() < 1e-9);
    }
}
