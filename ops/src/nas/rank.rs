//! Combining indicators (`docs/methods/training-free-nas.md` §3): rank-sum with ties and the
//! changing-range reward.

use std::collections::VecDeque;

use super::indicators::Indicator;

/// 1-based ranks, best first; equal values share the average of the ranks they span; `None`
/// (a failed measurement) ranks after every value, the failures tied among themselves.
pub fn ranks_with_ties(values: &[Option<f64>], higher_is_better: bool) -> Vec<f64> {
    let n = values.len();
    let key = |i: usize| -> (bool, f64) {
        match values[i] {
            Some(v) if !v.is_nan() => (false, if higher_is_better { -v } else { v }),
            _ => (true, 0.0),
        }
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let (fa, va) = key(a);
        let (fb, vb) = key(b);
        fa.cmp(&fb).then(va.total_cmp(&vb))
    });
    let mut ranks = vec![0.0; n];
    let mut start = 0;
    while start < n {
        let mut end = start + 1;
        while end < n && key(order[end]) == key(order[start]) {
            end += 1;
        }
        // Positions start..end (0-based) hold ranks start+1..=end; their mean is shared.
        let shared = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = shared;
        }
        start = end;
    }
    ranks
}

/// `docs/methods/training-free-nas.md` §3: per candidate, the sum over indicators of its rank among
/// `candidates` (lower is better). `candidates[i][j]` is indicator j of candidate i.
pub fn rank_sums(candidates: &[Vec<Option<f64>>], indicators: &[Indicator]) -> Vec<f64> {
    let mut sums = vec![0.0; candidates.len()];
    for (j, ind) in indicators.iter().enumerate() {
        let column: Vec<Option<f64>> = candidates
            .iter()
            .map(|c| c.get(j).copied().flatten())
            .collect();
        for (s, r) in sums
            .iter_mut()
            .zip(ranks_with_ties(&column, ind.higher_is_better()))
        {
            *s += r;
        }
    }
    sums
}

/// The index of the smallest rank sum among candidates that have every value (the first on a
/// tie); `None` when every candidate failed.
pub fn best_by_rank_sum(
    candidates: &[Vec<Option<f64>>],
    indicators: &[Indicator],
) -> Option<usize> {
    let sums = rank_sums(candidates, indicators);
    (0..candidates.len())
        .filter(|&i| candidates[i].iter().all(Option::is_some))
        .min_by(|&a, &b| sums[a].total_cmp(&sums[b]).then(a.cmp(&b)))
}

/// `docs/methods/training-free-nas.md` §3, the changing-range reward: per indicator,
/// Delta_t = (v_t - v_{t-1}) / (max - min of the last `window` values + 1e-6), and
/// r_t = sum of +Delta for higher-is-better indicators and -Delta for the others (TEG-NAS:
/// -Delta(kappa) + Delta(R) - Delta(G)). A failed measurement takes the worst value seen so far
/// for that indicator; before any value was seen it contributes 0 and is not buffered.
#[derive(Clone, Debug)]
pub struct ChangingRange {
    indicators: Vec<Indicator>,
    window: usize,
    recent: Vec<VecDeque<f64>>,
    previous: Vec<Option<f64>>,
    worst: Vec<Option<f64>>,
}

impl ChangingRange {
    pub fn new(indicators: &[Indicator], window: usize) -> Self {
        let k = indicators.len();
        Self {
            indicators: indicators.to_vec(),
            window: window.max(1),
            recent: vec![VecDeque::new(); k],
            previous: vec![None; k],
            worst: vec![None; k],
        }
    }

    /// The reward of the next architecture; `values[j]` is indicator j (`None` = failed).
    pub fn reward(&mut self, values: &[Option<f64>]) -> f64 {
        let mut r = 0.0;
        for (j, ind) in self.indicators.iter().enumerate() {
            let hib = ind.higher_is_better();
            let v = match values.get(j).copied().flatten().filter(|v| v.is_finite()) {
                Some(v) => {
                    let worse = |w: f64| if hib { v < w } else { v > w };
                    if self.worst[j].is_none_or(worse) {
                        self.worst[j] = Some(v);
                    }
                    v
                }
                None => match self.worst[j] {
                    Some(w) => w,
                    None => continue,
                },
            };
            let buf = &mut self.recent[j];
            buf.push_back(v);
            while buf.len() > self.window {
                buf.pop_front();
            }
            let (lo, hi) = buf
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            if let Some(p) = self.previous[j] {
                let delta = (v - p) / (hi - lo + 1e-6);
                r += if hib { delta } else { -delta };
            }
            self.previous[j] = Some(v);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_share_the_average_rank_and_failures_rank_last() {
        let v = [Some(3.0), Some(1.0), Some(3.0), None, Some(2.0), None];
        assert_eq!(
            ranks_with_ties(&v, false),
            vec![3.5, 1.0, 3.5, 5.5, 2.0, 5.5]
        );
        assert_eq!(
            ranks_with_ties(&v, true),
            vec![1.5, 4.0, 1.5, 5.5, 3.0, 5.5]
        );
        // Rank sums: kappa ascending + R descending.
        let c = vec![
            vec![Some(10.0), Some(5.0)],
            vec![Some(20.0), Some(5.0)],
            vec![Some(10.0), Some(9.0)],
            vec![None, Some(100.0)],
        ];
        let s = rank_sums(&c, &[Indicator::Ntk, Indicator::Regions]);
        // kappa ranks 1.5, 3, 1.5, 4; R ranks 3.5, 3.5, 2, 1.
        assert_eq!(s, vec![5.0, 6.5, 3.5, 5.0]);
        assert_eq!(
            best_by_rank_sum(&c, &[Indicator::Ntk, Indicator::Regions]),
            Some(2)
        );
        assert_eq!(best_by_rank_sum(&[vec![None]], &[Indicator::Ntk]), None);
    }

    #[test]
    fn changing_range_reward_follows_the_method() {
        let mut cr = ChangingRange::new(&[Indicator::Ntk, Indicator::Regions], 10);
        assert_eq!(cr.reward(&[Some(10.0), Some(4.0)]), 0.0);
        // kappa 10 -> 6: Delta = -4 / (4 + 1e-6); R 4 -> 6: Delta = 2 / (2 + 1e-6).
        let r = cr.reward(&[Some(6.0), Some(6.0)]);
        let want = 4.0 / (4.0 + 1e-6) + 2.0 / (2.0 + 1e-6);
        assert!((r - want).abs() < 1e-12, "{r} vs {want}");
        // A failure takes the worst values seen (kappa 10, R 4).
        let r = cr.reward(&[None, None]);
        let want = -4.0 / (4.0 + 1e-6) - 2.0 / (2.0 + 1e-6);
        assert!((r - want).abs() < 1e-12, "{r} vs {want}");
    }
}
