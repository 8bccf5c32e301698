//! Search algorithms over the NB201 space (`docs/methods/training-free-nas.md` §4), generic
//! over a [`Scorer`] so that tests can plug in a synthetic score. Every supernet or cell scored
//! is kept, once, in a trajectory; batches of candidates are scored in parallel on a rayon pool
//! and the results depend only on the seed (never on the number of threads).

use std::collections::{HashMap, VecDeque};

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::Serialize;

use super::indicators::{Failure, Indicator};
use super::rank::{best_by_rank_sum, rank_sums, ChangingRange};
use super::space::{Arch, OpSets, Space, NUM_EDGES, NUM_OPS};

/// Scores supernets (a cell is a supernet with one op per edge) on a fixed indicator list.
pub trait Scorer: Sync {
    fn indicators(&self) -> &[Indicator];
    /// One result per indicator, in order. A failed indicator leaves the others standing: the
    /// candidate drops out of that indicator's ranking and the rank sum only.
    fn score(&self, sets: &OpSets) -> Vec<Result<f64, Failure>>;
}

/// One scored candidate.
#[derive(Clone, Debug)]
pub struct Record {
    pub sets: OpSets,
    /// Which part of the search scored it (`initial`, `cycle 3`, `round 2`, ...).
    pub phase: String,
    /// One result per indicator.
    pub results: Vec<Result<f64, Failure>>,
}

impl Record {
    pub fn values(&self) -> Vec<Option<f64>> {
        self.results
            .iter()
            .map(|r| r.as_ref().ok().copied())
            .collect()
    }

    /// The first failed indicator's failure, if any.
    pub fn failure(&self) -> Option<&Failure> {
        self.results.iter().find_map(|r| r.as_ref().err())
    }
}

/// Why a search stopped without an answer.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Invalid(String),
    #[error("every candidate failed its indicators; the last failure: {0}")]
    AllFailed(String),
}

/// The trajectory and the memo of what was scored.
pub struct Evaluator<'a, S: Scorer> {
    scorer: &'a S,
    pool: &'a rayon::ThreadPool,
    cancelled: &'a (dyn Fn() -> bool + Sync),
    pub records: Vec<Record>,
    index: HashMap<OpSets, usize>,
}

impl<'a, S: Scorer> Evaluator<'a, S> {
    pub fn new(
        scorer: &'a S,
        pool: &'a rayon::ThreadPool,
        cancelled: &'a (dyn Fn() -> bool + Sync),
    ) -> Self {
        Self {
            scorer,
            pool,
            cancelled,
            records: Vec::new(),
            index: HashMap::new(),
        }
    }

    fn k(&self) -> usize {
        self.scorer.indicators().len()
    }

    /// Scores the candidates not seen before, in parallel; returns each candidate's record index.
    pub fn score(&mut self, sets: &[OpSets], phase: &str) -> Result<Vec<usize>, SearchError> {
        if (self.cancelled)() {
            return Err(SearchError::Cancelled);
        }
        let mut todo: Vec<OpSets> = Vec::new();
        for s in sets {
            if !self.index.contains_key(s) && !todo.contains(s) {
                todo.push(*s);
            }
        }
        let scorer = self.scorer;
        let scored: Vec<Vec<Result<f64, Failure>>> = self
            .pool
            .install(|| todo.par_iter().map(|s| scorer.score(s)).collect());
        for (s, results) in todo.into_iter().zip(scored) {
            self.index.insert(s, self.records.len());
            self.records.push(Record {
                sets: s,
                phase: phase.to_string(),
                results,
            });
        }
        Ok(sets.iter().map(|s| self.index[s]).collect())
    }

    fn values(&self, i: usize) -> Vec<Option<f64>> {
        self.records[i].values()
    }

    /// The rank-sum best of `indices` (record indices).
    pub fn best_of(&self, indices: &[usize]) -> Result<usize, SearchError> {
        let table: Vec<Vec<Option<f64>>> = indices.iter().map(|&i| self.values(i)).collect();
        match best_by_rank_sum(&table, self.scorer.indicators()) {
            Some(j) => Ok(indices[j]),
            None => Err(SearchError::AllFailed(
                indices
                    .last()
                    .and_then(|&i| self.records[i].failure())
                    .map_or_else(|| "no candidates".to_string(), ToString::to_string),
            )),
        }
    }

    /// The rank-sum best over every single cell scored so far.
    pub fn best_cell(&self) -> Result<usize, SearchError> {
        let cells: Vec<usize> = (0..self.records.len())
            .filter(|&i| self.records[i].sets.single().is_some())
            .collect();
        self.best_of(&cells)
    }
}

/// What a random search drew, for the output.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RandomDraws {
    /// Distinct cells drawn from the whole space.
    pub drawn: usize,
    /// Of those, the cells the connectivity filter rejected (never scored).
    pub rejected: usize,
}

/// Random sampling baseline (§4): `samples` distinct cells drawn uniformly from the whole
/// space (fewer if it is smaller), scored, the rank-sum best taken. With a filtered `space`
/// the draws are the same (same seed, same cells) but the ones the filter rejects are never
/// scored (`docs/methods/connectivity.md` §3: "rejected architectures are never scored"), so a
/// filtered and an unfiltered run compare the same proposals at a lower scoring cost.
pub fn random_search<S: Scorer>(
    ev: &mut Evaluator<'_, S>,
    space: &Space,
    samples: usize,
    seed: u64,
) -> Result<(usize, RandomDraws), SearchError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let drawn = distinct_samples(&Space::All, samples, &mut rng)?;
    let cells: Vec<OpSets> = drawn
        .iter()
        .copied()
        .filter(|s| s.single().is_some_and(|a| space.accepts(&a)))
        .collect();
    if cells.is_empty() {
        return Err(SearchError::Invalid(format!(
            "the filter rejected all {} cells drawn; raise `samples`",
            drawn.len()
        )));
    }
    let idx = ev.score(&cells, "random")?;
    let draws = RandomDraws {
        drawn: drawn.len(),
        rejected: drawn.len() - cells.len(),
    };
    Ok((ev.best_of(&idx)?, draws))
}

/// Scores the given cells (a fixed sample, e.g. the cells a pipeline also trains) and takes
/// the rank-sum best; repeated cells are scored once.
pub fn listed_search<S: Scorer>(
    ev: &mut Evaluator<'_, S>,
    cells: &[Arch],
) -> Result<usize, SearchError> {
    if cells.is_empty() {
        return Err(SearchError::Invalid("no cells listed".into()));
    }
    let sets: Vec<OpSets> = cells.iter().map(Arch::op_sets).collect();
    let idx = ev.score(&sets, "listed")?;
    ev.best_of(&idx)
}

fn distinct_samples(space: &Space, n: usize, rng: &mut StdRng) -> Result<Vec<OpSets>, SearchError> {
    let want = n.min(space.size());
    let mut out: Vec<OpSets> = Vec::with_capacity(want);
    let mut tries = 0;
    while out.len() < want && tries < 100 * want.max(1) {
        tries += 1;
        let a = space
            .sample(rng)
            .ok_or_else(|| SearchError::Invalid("the filtered space is empty".into()))?;
        let s = a.op_sets();
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Regularized evolution with rank-sum selection (TEG-NAS, §4): a population of `population`
/// random cells; each cycle samples `tournament` members, mutates the rank-sum best of the
/// sample into a child, adds the child and drops the oldest. `batch` children are made per
/// round and scored in parallel (`batch = 1` is the paper's sequential loop). Answer: the
/// rank-sum best of the final population.
#[derive(Clone, Debug)]
pub struct EvolutionConfig {
    pub population: usize,
    pub tournament: usize,
    pub cycles: usize,
    pub batch: usize,
}

pub fn evolution<S: Scorer>(
    ev: &mut Evaluator<'_, S>,
    space: &Space,
    cfg: &EvolutionConfig,
    seed: u64,
) -> Result<usize, SearchError> {
    if cfg.population == 0 || cfg.tournament == 0 || cfg.tournament > cfg.population {
        return Err(SearchError::Invalid(format!(
            "tournament {} must be in 1..=population {}",
            cfg.tournament, cfg.population
        )));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut init = Vec::with_capacity(cfg.population);
    for _ in 0..cfg.population {
        let a = space
            .sample(&mut rng)
            .ok_or_else(|| SearchError::Invalid("the filtered space is empty".into()))?;
        init.push(a.op_sets());
    }
    let mut population: VecDeque<usize> = ev.score(&init, "initial")?.into();
    let mut made = 0;
    let mut round = 0;
    while made < cfg.cycles {
        let n = cfg.batch.max(1).min(cfg.cycles - made);
        let mut children = Vec::with_capacity(n);
        for _ in 0..n {
            let members: Vec<usize> = sample(&mut rng, population.len(), cfg.tournament)
                .into_iter()
                .map(|i| population[i])
                .collect();
            // A tournament of failures has no best: mutate its first member.
            let parent = ev.best_of(&members).unwrap_or(members[0]);
            let Some(arch) = ev.records[parent].sets.single() else {
                return Err(SearchError::Invalid(
                    "a population member is not a cell".into(),
                ));
            };
            let child = space
                .mutate(&arch, &mut rng)
                .ok_or_else(|| SearchError::Invalid("the filtered space is empty".into()))?;
            children.push(child.op_sets());
        }
        round += 1;
        for c in ev.score(&children, &format!("cycle {round}"))? {
            population.push_back(c);
            population.pop_front();
        }
        made += n;
    }
    ev.best_of(&population.into_iter().collect::<Vec<_>>())
}

/// REINFORCE (TEG-NAS, §4): an independent categorical per edge, logits 1e-3 N(0, 1), Adam on the
/// logits, an EMA baseline, the changing-range reward (§3). `batch` cells are drawn per step and
/// scored in parallel; their rewards are computed in draw order (`batch = 1` is the paper's).
/// Answer: the rank-sum best of every cell seen.
#[derive(Clone, Debug)]
pub struct ReinforceConfig {
    pub steps: usize,
    pub lr: f64,
    pub momentum: f64,
    pub window: usize,
    pub batch: usize,
}

/// What REINFORCE learned, for the output.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyTrace {
    /// Final softmax probabilities, per edge.
    pub probabilities: Vec<Vec<f64>>,
    /// Reward of each draw, in order.
    pub rewards: Vec<f64>,
}

fn softmax(l: &[f64]) -> Vec<f64> {
    let m = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = l.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

pub fn reinforce<S: Scorer>(
    ev: &mut Evaluator<'_, S>,
    space: &Space,
    cfg: &ReinforceConfig,
    seed: u64,
) -> Result<(usize, PolicyTrace), SearchError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n_par = NUM_EDGES * NUM_OPS;
    let mut logits: Vec<f64> = (0..n_par)
        .map(|_| 1e-3 * Distribution::<f64>::sample(&StandardNormal, &mut rng))
        .collect::<Vec<f64>>();
    let (mut m1, mut m2) = (vec![0.0; n_par], vec![0.0; n_par]);
    let (beta1, beta2, eps) = (0.9, 0.999, 1e-8);
    let mut baseline = 0.0;
    let mut reward_fn = ChangingRange::new(ev.scorer.indicators(), cfg.window);
    let mut rewards = Vec::new();
    for step in 0..cfg.steps {
        let probs: Vec<Vec<f64>> = logits.chunks(NUM_OPS).map(softmax).collect();
        let mut draws = Vec::with_capacity(cfg.batch.max(1));
        for _ in 0..cfg.batch.max(1) {
            let mut draw = || {
                let mut ops = [0u8; NUM_EDGES];
                for (e, slot) in ops.iter_mut().enumerate() {
                    let u: f64 = rng.gen();
                    let mut acc = 0.0;
                    *slot = (NUM_OPS - 1) as u8;
                    for (o, p) in probs[e].iter().enumerate() {
                        acc += p;
                        if u < acc {
                            *slot = o as u8;
                            break;
                        }
                    }
                }
                Arch(ops)
            };
            let a = space.rejection_sample(&mut draw).ok_or_else(|| {
                SearchError::Invalid(
                    "the policy drew no cell the filter accepts in 1000 tries".into(),
                )
            })?;
            draws.push(a);
        }
        let sets: Vec<OpSets> = draws.iter().map(Arch::op_sets).collect();
        let idx = ev.score(&sets, &format!("step {}", step + 1))?;
        // grad of sum_b (r_b - baseline_b) log pi(a_b) w.r.t. the logits: (onehot - pi) per edge.
        let mut grad = vec![0.0; n_par];
        for (a, &i) in draws.iter().zip(&idx) {
            let values = ev.records[i].values();
            let r = reward_fn.reward(&values);
            rewards.push(r);
            let adv = r - baseline;
            baseline = cfg.momentum * baseline + (1.0 - cfg.momentum) * r;
            for (e, &op) in a.0.iter().enumerate() {
                for o in 0..NUM_OPS {
                    let onehot = if o == op as usize { 1.0 } else { 0.0 };
                    grad[e * NUM_OPS + o] += adv * (onehot - probs[e][o]) / draws.len() as f64;
                }
            }
        }
        // Adam, ascending the objective.
        let t = (step + 1) as i32;
        for p in 0..n_par {
            m1[p] = beta1 * m1[p] + (1.0 - beta1) * grad[p];
            m2[p] = beta2 * m2[p] + (1.0 - beta2) * grad[p] * grad[p];
            let mh = m1[p] / (1.0 - beta1.powi(t));
            let vh = m2[p] / (1.0 - beta2.powi(t));
            logits[p] += cfg.lr * mh / (vh.sqrt() + eps);
        }
    }
    let best = ev.best_cell()?;
    Ok((
        best,
        PolicyTrace {
            probabilities: logits.chunks(NUM_OPS).map(softmax).collect(),
            rewards,
        },
    ))
}

/// One pruning round of TE-NAS, for the output.
#[derive(Clone, Debug, Serialize)]
pub struct PruneRound {
    /// The supernet at the start of the round (`"01234/..."`).
    pub supernet: String,
    /// Record index of the supernet's own score.
    pub base: usize,
    /// `(edge, op, record index of N \ o, relative changes per indicator, rank sum)`.
    pub candidates: Vec<PruneCandidate>,
    /// `(edge, op)` removed.
    pub pruned: Vec<(usize, u8)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PruneCandidate {
    pub edge: usize,
    pub op: u8,
    pub record: usize,
    /// (v(N) - v(N \ o)) / v(N) per indicator; `None` where either failed.
    pub relative_change: Vec<Option<f64>>,
    pub rank_sum: f64,
}

/// TE-NAS pruning (arXiv 2102.11535 §3.3, as VITA-Group/TENAS `prune_tenas.py` runs it): from
/// the supernet with every op but `none` on every edge (active ops mixed by 1/k_active), repeat
/// until each edge keeps one op: score N \ o for every remaining (edge, op), take the relative
/// changes d = (v(N) - v(N \ o)) / v(N) rounded to 3 significant digits, rank them (dkappa
/// descending, dR ascending: the op whose removal helps trainability most and costs the fewest
/// regions ranks first; a lower-is-better indicator such as G like kappa) and on each edge
/// remove the op with the smallest rank sum. A failed N \ o ranks worst: the op it lacks is
/// kept. Which indicators rank is the scorer's list: TE-NAS uses kappa and R; adding G is
/// TEG-NAS's variant.
pub fn prune<S: Scorer>(
    ev: &mut Evaluator<'_, S>,
) -> Result<(usize, Vec<PruneRound>), SearchError> {
    let k = ev.k();
    let mut net = OpSets::full_without_none();
    let mut rounds = Vec::new();
    let mut round = 0;
    while net.single().is_none() {
        round += 1;
        let phase = format!("round {round}");
        let base = ev.score(&[net], &phase)?[0];
        let base_values = ev.values(base);
        let mut pairs = Vec::new();
        for e in 0..NUM_EDGES {
            if net.count(e) > 1 {
                pairs.extend(net.ops(e).map(|o| (e, o)));
            }
        }
        let cands: Vec<OpSets> = pairs.iter().map(|&(e, o)| net.without(e, o)).collect();
        let idx = ev.score(&cands, &phase)?;
        let changes: Vec<Vec<Option<f64>>> = idx
            .iter()
            .map(|&i| {
                let v = ev.values(i);
                (0..k)
                    .map(|j| match (base_values[j], v[j]) {
                        (Some(b), Some(v)) if b != 0.0 => Some(round_significant((b - v) / b, 3)),
                        _ => None,
                    })
                    .collect()
            })
            .collect();
        // Ranking -d in each indicator's own direction orders d descending for lower-is-better
        // indicators (kappa, G) and ascending for higher-is-better ones (R).
        let neg: Vec<Vec<Option<f64>>> = changes
            .iter()
            .map(|c| c.iter().map(|d| d.map(|d| -d)).collect())
            .collect();
        let sums = rank_sums(&neg, ev.scorer.indicators());
        let mut candidates = Vec::with_capacity(pairs.len());
        for (c, (&(edge, op), &record)) in pairs.iter().zip(&idx).enumerate() {
            candidates.push(PruneCandidate {
                edge,
                op,
                record,
                relative_change: changes[c].clone(),
                rank_sum: sums[c],
            });
        }
        let mut pruned = Vec::new();
        for e in 0..NUM_EDGES {
            let best = (0..pairs.len())
                .filter(|&c| pairs[c].0 == e)
                .min_by(|&a, &b| sums[a].total_cmp(&sums[b]).then(a.cmp(&b)));
            if let Some(c) = best {
                pruned.push(pairs[c]);
            }
        }
        let before = net.label();
        for &(e, o) in &pruned {
            net = net.without(e, o);
        }
        rounds.push(PruneRound {
            supernet: before,
            base,
            candidates,
            pruned,
        });
    }
    let last = ev.score(&[net], "final")?[0];
    Ok((last, rounds))
}

/// `x` rounded to `digits` significant decimal digits (0 stays 0).
pub fn round_significant(x: f64, digits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let scale = 10f64.powi(digits - 1 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_keeps_three_significant_digits() {
        assert_eq!(round_significant(0.012345, 3), 0.0123);
        assert_eq!(round_significant(-123.45, 3), -123.0);
        assert_eq!(round_significant(0.0, 3), 0.0);
    }

    #[test]
    fn pruning_never_mixes_prunes_or_keeps_none() {
        let (i, r) = run(2, |ev| prune(ev).unwrap());
        let (last, rounds) = i;
        assert!(r[last].sets.single().unwrap().0.iter().all(|&o| o != 0));
        for round in &rounds {
            assert!(round.candidates.iter().all(|c| c.op != 0));
        }
        assert!(r
            .iter()
            .all(|x| (0..NUM_EDGES).all(|e| x.sets.0[e] & 1 == 0)));
        // Four ops per edge at the start: three rounds.
        assert_eq!(rounds.len(), 3);
    }

    /// A synthetic two-indicator space whose optimum is the cell `TARGET`: "kappa" counts
    /// edges that differ from it, "R" counts edges that agree (higher is better). Supernets get
    /// the mean over their ops, so pruning can follow the same signal. Cells whose first edge
    /// is `none` fail, to check that failures are never chosen.
    struct Synthetic;
    const TARGET: [u8; 6] = [3, 2, 1, 3, 4, 2];

    impl Scorer for Synthetic {
        fn indicators(&self) -> &[Indicator] {
            &[Indicator::Ntk, Indicator::Regions]
        }
        fn score(&self, s: &OpSets) -> Vec<Result<f64, Failure>> {
            let mut agree = 0.0;
            for (e, target) in TARGET.iter().enumerate() {
                let hit = s.ops(e).filter(|o| o == target).count() as f64;
                agree += hit / s.count(e) as f64;
            }
            let kappa = if s.0[0] == 1 {
                Err(Failure::NonFinite {
                    indicator: "ntk",
                    value: f64::NAN,
                })
            } else {
                Ok(1.0 + NUM_EDGES as f64 - agree)
            };
            vec![kappa, Ok(agree)]
        }
    }

    fn run<T>(
        threads: usize,
        f: impl FnOnce(&mut Evaluator<'_, Synthetic>) -> T,
    ) -> (T, Vec<Record>) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let never = || false;
        let mut ev = Evaluator::new(&Synthetic, &pool, &never);
        let out = f(&mut ev);
        (out, ev.records)
    }

    fn chosen(records: &[Record], i: usize) -> [u8; 6] {
        records[i].sets.single().unwrap().0
    }

    #[test]
    fn every_algorithm_finds_the_synthetic_optimum() {
        let (i, r) = run(2, |ev| random_search(ev, &Space::All, 15_625, 1).unwrap().0);
        assert_eq!(chosen(&r, i), TARGET);
        let (i, r) = run(2, |ev| prune(ev).unwrap().0);
        assert_eq!(chosen(&r, i), TARGET);
        let cfg = EvolutionConfig {
            population: 20,
            tournament: 5,
            cycles: 400,
            batch: 2,
        };
        let (i, r) = run(2, |ev| evolution(ev, &Space::All, &cfg, 3).unwrap());
        assert_eq!(chosen(&r, i), TARGET);
        let cfg = ReinforceConfig {
            steps: 300,
            lr: 0.1,
            momentum: 0.9,
            window: 10,
            batch: 2,
        };
        let ((i, trace), r) = run(2, |ev| reinforce(ev, &Space::All, &cfg, 5).unwrap());
        assert_eq!(chosen(&r, i), TARGET);
        // The policy has learned the target's first edge.
        assert!(
            trace.probabilities[0][3] > 0.5,
            "{:?}",
            trace.probabilities[0]
        );
    }

    #[test]
    fn failures_are_recorded_and_never_chosen() {
        // Only failing and one good cell: the good one wins even though failures exist.
        let (i, r) = run(1, |ev| random_search(ev, &Space::All, 300, 9).unwrap().0);
        assert!(r.iter().any(|x| x.failure().is_some()));
        assert!(r[i].failure().is_none());
        // A failed indicator leaves the others: kappa fails, R is still recorded.
        let failed = r.iter().find(|x| x.failure().is_some()).unwrap();
        assert!(failed.values()[0].is_none() && failed.values()[1].is_some());
        let (all_fail, _) = run(1, |ev| {
            let s = Arch([0, 3, 3, 3, 3, 3]).op_sets();
            let idx = ev.score(&[s], "x").unwrap();
            ev.best_of(&idx)
        });
        assert!(matches!(all_fail, Err(SearchError::AllFailed(_))));
    }

    #[test]
    fn a_filtered_random_search_scores_only_the_accepted_draws() {
        let (_, all) = run(1, |ev| random_search(ev, &Space::All, 200, 4).unwrap());
        // A made-up filter: cells whose last edge is a conv.
        let mut cells: Vec<Arch> = (0..15_625u32)
            .map(|mut c| {
                let mut ops = [0u8; NUM_EDGES];
                for slot in ops.iter_mut().rev() {
                    *slot = (c % 5) as u8;
                    c /= 5;
                }
                Arch(ops)
            })
            .filter(|a| a.0[5] == 2 || a.0[5] == 3)
            .collect();
        cells.sort();
        let space = Space::Accepted {
            cells,
            acceptance: crate::arch::filter::AcceptanceBox::paper_nb201(),
        };
        let ((_, draws), kept) = run(1, |ev| random_search(ev, &space, 200, 4).unwrap());
        let want: Vec<OpSets> = all
            .iter()
            .map(|r| r.sets)
            .filter(|s| s.single().is_some_and(|a| a.0[5] == 2 || a.0[5] == 3))
            .collect();
        assert_eq!(draws.drawn, 200);
        assert_eq!(draws.rejected, 200 - want.len());
        assert_eq!(kept.iter().map(|r| r.sets).collect::<Vec<_>>(), want);
        assert!(!want.is_empty() && want.len() < 200);
    }

    #[test]
    fn a_listed_search_scores_each_listed_cell_once() {
        let a = Arch(TARGET);
        let b = Arch([3, 3, 3, 3, 3, 3]);
        let (i, r) = run(2, |ev| listed_search(ev, &[b, a, b]).unwrap());
        assert_eq!(r.len(), 2);
        assert_eq!(chosen(&r, i), TARGET);
        let (e, _) = run(1, |ev| listed_search(ev, &[]));
        assert!(matches!(e, Err(SearchError::Invalid(_))));
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let cfg = EvolutionConfig {
            population: 10,
            tournament: 3,
            cycles: 40,
            batch: 4,
        };
        let (a, ra) = run(1, |ev| evolution(ev, &Space::All, &cfg, 11).unwrap());
        let (b, rb) = run(3, |ev| evolution(ev, &Space::All, &cfg, 11).unwrap());
        assert_eq!(a, b);
        let sets = |r: &[Record]| r.iter().map(|x| x.sets).collect::<Vec<_>>();
        assert_eq!(sets(&ra), sets(&rb));
    }
}
