//! What happened to stages, in the two words the engine has for it: a [`StageResult`] is what
//! running one stage produced, wherever it ran (a worker thread, a Slurm job's result file);
//! a [`StageReport`] is what a run did with a stage (reused, ran, failed, skipped), and a
//! [`RunSummary`] holds one per stage. A leaf: the worker, the executors, the scheduler and
//! the displays all use these types, and this module uses none of theirs.

use cache::{unix_now, Hash};
use ops::Metrics;
use serde::{Deserialize, Serialize};

/// How the attempts of a stage ended.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Outcome {
    Ok {
        tree: Hash,
        #[serde(with = "finite_or_text")]
        metrics: Metrics,
    },
    Failed {
        error: String,
    },
    Cancelled,
}

/// What running a stage produced: its outcome, its log, when and where it ran. Executors hand
/// it to the scheduler once it is recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageResult {
    pub outcome: Outcome,
    pub log_blob: Option<Hash>,
    pub log_tail: String,
    pub started_at: f64,
    pub ended_at: f64,
    pub host: String,
}

impl StageResult {
    /// A stage that failed without an op run to show for it (the engine could not run or
    /// record it, or a cluster job vanished): no duration, no host.
    pub fn failed_now(error: String, log_tail: String, log_blob: Option<Hash>) -> Self {
        Self::now(Outcome::Failed { error }, log_tail, log_blob)
    }

    /// A stage stopped before it produced anything.
    pub fn cancelled_now() -> Self {
        Self::now(Outcome::Cancelled, String::new(), None)
    }

    fn now(outcome: Outcome, log_tail: String, log_blob: Option<Hash>) -> Self {
        let now = unix_now();
        Self {
            outcome,
            log_blob,
            log_tail,
            started_at: now,
            ended_at: now,
            host: String::new(),
        }
    }

    pub fn metrics(&self) -> Metrics {
        match &self.outcome {
            Outcome::Ok { metrics, .. } => metrics.clone(),
            _ => Metrics::new(),
        }
    }

    pub fn duration_s(&self) -> f64 {
        (self.ended_at - self.started_at).max(0.0)
    }
}

/// What a run did with one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageStatus {
    Cached,
    Ran,
    Failed,
    Skipped,
}

/// What happened to one stage instance in a run.
#[derive(Debug, Clone)]
pub struct StageReport {
    pub node: usize,
    pub status: StageStatus,
    pub key: Option<String>,
    pub duration_s: f64,
    pub metrics: Metrics,
    pub tree: Option<Hash>,
    /// Failure message or skip reason.
    pub message: Option<String>,
    /// Why it ran (for `ran`), from the key diff.
    pub reasons: Vec<String>,
}

impl StageReport {
    /// A stage whose result was reused.
    pub fn cached(node: usize, key: String, (tree, metrics): (Hash, Metrics)) -> Self {
        Self {
            node,
            status: StageStatus::Cached,
            key: Some(key),
            duration_s: 0.0,
            metrics,
            tree: Some(tree),
            message: None,
            reasons: Vec::new(),
        }
    }

    /// A stage that did not run, and why.
    pub fn skipped(node: usize, message: String) -> Self {
        Self {
            node,
            status: StageStatus::Skipped,
            key: None,
            duration_s: 0.0,
            metrics: Metrics::new(),
            tree: None,
            message: Some(message),
            reasons: Vec::new(),
        }
    }
}

pub struct RunSummary {
    pub reports: Vec<StageReport>,
    pub interrupted: bool,
    pub wall_s: f64,
}

impl RunSummary {
    pub fn count(&self, status: StageStatus) -> usize {
        self.reports.iter().filter(|r| r.status == status).count()
    }
}

/// JSON has no NaN or infinity; metrics (a diverged loss is a result) keep them as text.
mod finite_or_text {
    use ops::Metrics;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::Value;

    pub fn serialize<S: Serializer>(m: &Metrics, s: S) -> Result<S::Ok, S::Error> {
        let v: serde_json::Map<String, Value> = m
            .iter()
            .map(|(k, x)| {
                let v = serde_json::Number::from_f64(*x)
                    .map(Value::Number)
                    .unwrap_or_else(|| Value::String(x.to_string()));
                (k.clone(), v)
            })
            .collect();
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Metrics, D::Error> {
        let v = serde_json::Map::<String, Value>::deserialize(d)?;
        v.into_iter()
            .map(|(k, x)| {
                let f = match &x {
                    Value::Number(n) => n.as_f64(),
                    Value::String(s) => s.parse::<f64>().ok(),
                    _ => None,
                };
                f.map(|f| (k.clone(), f)).ok_or_else(|| {
                    serde::de::Error::custom(format!("metric {k}: {x} is not a number"))
                })
            })
            .collect()
    }
}
