//! Rank and linear correlation: Kendall's tau-b (with ties) and Pearson's r, used to compare
//! rankings (`docs/methods/arch-aware.md` §4.2) and predicted vs probed maximal LRs (§4.1).

/// Kendall's tau-b = (n_c - n_d) / sqrt((n0 - n1)(n0 - n2)), with n0 = n(n-1)/2, n1 / n2 the
/// pairs tied in x / y (Kendall 1945; Knight 1966's O(n log n) count, as in scipy). `None` when
/// the lengths differ, n < 2, or either variable is constant.
pub fn kendall_tau_b(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n != y.len() || n < 2 || x.iter().chain(y).any(|v| v.is_nan()) {
        return None;
    }
    let mut pairs: Vec<(f64, f64)> = x.iter().copied().zip(y.iter().copied()).collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let tied_pairs = |runs: &mut dyn Iterator<Item = usize>| -> u64 {
        runs.map(|t| (t as u64) * (t as u64 - 1) / 2).sum()
    };
    let n0 = (n as u64) * (n as u64 - 1) / 2;
    let n1 = tied_pairs(&mut run_lengths(&pairs, |a, b| a.0 == b.0));
    let n3 = tied_pairs(&mut run_lengths(&pairs, |a, b| a.0 == b.0 && a.1 == b.1));
    // Pairs sorted by x then y: every inversion left when sorting by y is a discordant pair.
    let mut ys: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    let mut buf = vec![0.0; n];
    let swaps = merge_count(&mut ys, &mut buf);
    let n2 = tied_pairs(&mut run_lengths(&ys, |a, b| a == b));
    let denom = ((n0 - n1) as f64 * (n0 - n2) as f64).sqrt();
    if denom == 0.0 {
        return None;
    }
    // n_c - n_d = n0 - n1 - n2 + n3 - 2 * swaps.
    let diff = n0 as f64 - n1 as f64 - n2 as f64 + n3 as f64 - 2.0 * swaps as f64;
    Some(diff / denom)
}

/// Bootstrap draws behind [`kendall_tau_se`].
pub const TAU_BOOTSTRAP_DRAWS: usize = 1000;

/// The standard error of Kendall's tau-b of `(x, y)`: the standard deviation of tau over
/// [`TAU_BOOTSTRAP_DRAWS`] resamples of the pairs with replacement (a fixed seed, so the same
/// data always give the same figure; resamples whose tau is undefined are skipped). Unlike the
/// null-hypothesis formula sqrt(2 (2n + 5) / (9 n (n - 1))) it holds for a correlated pair too.
/// `None` when tau itself is undefined.
pub fn kendall_tau_se(x: &[f64], y: &[f64]) -> Option<f64> {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    kendall_tau_b(x, y)?;
    let n = x.len();
    let mut rng = StdRng::seed_from_u64(0x7a05);
    let (mut bx, mut by) = (vec![0.0; n], vec![0.0; n]);
    let mut taus = Vec::with_capacity(TAU_BOOTSTRAP_DRAWS);
    for _ in 0..TAU_BOOTSTRAP_DRAWS {
        for k in 0..n {
            let i = rng.gen_range(0..n);
            bx[k] = x[i];
            by[k] = y[i];
        }
        if let Some(t) = kendall_tau_b(&bx, &by) {
            taus.push(t);
        }
    }
    if taus.len() < 2 {
        return None;
    }
    let m = taus.iter().sum::<f64>() / taus.len() as f64;
    let var = taus.iter().map(|t| (t - m) * (t - m)).sum::<f64>() / (taus.len() - 1) as f64;
    Some(var.sqrt())
}

/// Lengths of runs of equal neighbours in a sorted slice.
fn run_lengths<T>(v: &[T], eq: impl Fn(&T, &T) -> bool) -> impl Iterator<Item = usize> + '_ {
    let mut starts = Vec::new();
    for i in 0..v.len() {
        if i == 0 || !eq(&v[i - 1], &v[i]) {
            starts.push(i);
        }
    }
    let ends: Vec<usize> = starts.iter().skip(1).copied().chain([v.len()]).collect();
    starts.into_iter().zip(ends).map(|(s, e)| e - s)
}

/// Stable merge sort of `v` ascending; returns the number of strict inversions.
fn merge_count(v: &mut [f64], buf: &mut [f64]) -> u64 {
    let n = v.len();
    if n < 2 {
        return 0;
    }
    let mid = n / 2;
    let mut swaps = {
        let (a, b) = v.split_at_mut(mid);
        let (ba, bb) = buf.split_at_mut(mid);
        merge_count(a, ba) + merge_count(b, bb)
    };
    let (mut i, mut j, mut k) = (0, mid, 0);
    while i < mid && j < n {
        if v[j] < v[i] {
            buf[k] = v[j];
            swaps += (mid - i) as u64;
            j += 1;
        } else {
            buf[k] = v[i];
            i += 1;
        }
        k += 1;
    }
    buf[k..k + mid - i].copy_from_slice(&v[i..mid]);
    k += mid - i;
    buf[k..k + n - j].copy_from_slice(&v[j..n]);
    v.copy_from_slice(&buf[..n]);
    swaps
}

/// Pearson's r = cov(x, y) / (sd(x) sd(y)); `None` when the lengths differ, n < 2, or either
/// variable is constant.
pub fn pearson_r(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len();
    if n != y.len() || n < 2 {
        return None;
    }
    let mx = x.iter().sum::<f64>() / n as f64;
    let my = y.iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    let denom = (sxx * syy).sqrt();
    (denom > 0.0 && denom.is_finite()).then(|| sxy / denom)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn tau_standard_error_is_near_the_null_formula_for_independent_data() {
        let mut rng = StdRng::seed_from_u64(8);
        let n = 64;
        let x: Vec<f64> = (0..n).map(|_| rng.gen()).collect();
        let y: Vec<f64> = (0..n).map(|_| rng.gen()).collect();
        let se = kendall_tau_se(&x, &y).unwrap();
        let null = (2.0 * (2.0 * n as f64 + 5.0) / (9.0 * n as f64 * (n as f64 - 1.0))).sqrt();
        assert!(
            (se - null).abs() < 0.3 * null,
            "bootstrap {se} vs null {null}"
        );
        // A perfect ranking resamples to tau 1 (ties only): no spread.
        assert!(kendall_tau_se(&x, &x).unwrap() < 1e-12);
        assert_eq!(kendall_tau_se(&[1.0], &[2.0]), None);
    }

    /// The definition, pair by pair.
    fn tau_b_brute(x: &[f64], y: &[f64]) -> Option<f64> {
        let n = x.len();
        if n < 2 {
            return None;
        }
        let (mut c, mut d, mut tx, mut ty) = (0i64, 0i64, 0i64, 0i64);
        for i in 0..n {
            for j in 0..i {
                let sx = (x[i] - x[j]).signum() * ((x[i] != x[j]) as i32 as f64);
                let sy = (y[i] - y[j]).signum() * ((y[i] != y[j]) as i32 as f64);
                if sx == 0.0 {
                    tx += 1;
                }
                if sy == 0.0 {
                    ty += 1;
                }
                if sx * sy > 0.0 {
                    c += 1;
                } else if sx * sy < 0.0 {
                    d += 1;
                }
            }
        }
        let n0 = (n * (n - 1) / 2) as i64;
        let denom = (((n0 - tx) * (n0 - ty)) as f64).sqrt();
        (denom > 0.0).then(|| (c - d) as f64 / denom)
    }

    #[test]
    fn tau_b_matches_brute_force_with_ties() {
        let mut rng = StdRng::seed_from_u64(42);
        for case in 0..400 {
            let n = rng.gen_range(0..40);
            // Few distinct levels in some cases to force many ties (and constant vectors).
            let levels = if case % 3 == 0 { 3 } else { 1000 };
            let x: Vec<f64> = (0..n).map(|_| rng.gen_range(0..levels) as f64).collect();
            let y: Vec<f64> = (0..n)
                .map(|i| {
                    if case % 5 == 0 {
                        x[i] + rng.gen_range(0..2) as f64
                    } else {
                        rng.gen_range(0..levels) as f64
                    }
                })
                .collect();
            let fast = kendall_tau_b(&x, &y);
            let slow = tau_b_brute(&x, &y);
            match (fast, slow) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-12, "case {case}: {a} vs {b}"),
                (a, b) => assert_eq!(a, b, "case {case}: x={x:?} y={y:?}"),
            }
        }
    }

    #[test]
    fn tau_b_known_values() {
        assert_eq!(kendall_tau_b(&[1., 2., 3.], &[1., 2., 3.]), Some(1.0));
        assert_eq!(kendall_tau_b(&[1., 2., 3.], &[3., 2., 1.]), Some(-1.0));
        // scipy.stats.kendalltau([1, 2, 2, 3], [1, 3, 2, 4]) = 0.9128709291752769.
        let t = kendall_tau_b(&[1., 2., 2., 3.], &[1., 3., 2., 4.]).unwrap();
        assert!((t - 0.912_870_929_175_276_9).abs() < 1e-12, "{t}");
        assert_eq!(kendall_tau_b(&[1., 1.], &[1., 2.]), None);
        assert_eq!(kendall_tau_b(&[1.], &[1.]), None);
    }

    #[test]
    fn pearson_known_values() {
        let r = pearson_r(&[1., 2., 3., 4.], &[2., 4., 6., 8.]).unwrap();
        assert!((r - 1.0).abs() < 1e-12);
        // x = 1..5, y = (2, 1, 4, 3, 5): sxy = 8, sxx = syy = 10, so r = 0.8.
        let r = pearson_r(&[1., 2., 3., 4., 5.], &[2., 1., 4., 3., 5.]).unwrap();
        assert!((r - 0.8).abs() < 1e-12, "{r}");
        assert_eq!(pearson_r(&[1., 1.], &[1., 2.]), None);
    }
}
