//! What an op produces: the files of its output folder and its metrics, written through one
//! owner so every op writes JSON, metrics and labels the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::{Metrics, OpError};

/// The file every op that reports metrics writes beside its results (flat name -> number), read
/// back by `indicators.correlate`, `arch.rerank` and users.
pub const METRICS_FILE: &str = "metrics.json";

/// An op's output folder and metrics sink, handed to [`crate::TypedOp::run`].
pub struct Outputs<'a> {
    dir: &'a Path,
    metrics: Metrics,
}

impl<'a> Outputs<'a> {
    pub fn new(dir: &'a Path) -> Self {
        Self {
            dir,
            metrics: Metrics::new(),
        }
    }

    /// The fresh output folder; everything in it becomes the stage's result.
    pub fn dir(&self) -> &'a Path {
        self.dir
    }

    /// `name` inside the output folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes `value` as pretty JSON to `name` in the output folder.
    pub fn write_json(&self, name: &str, value: &impl Serialize) -> Result<(), OpError> {
        write_json(&self.path(name), value)
    }

    /// Records one metric (a queryable row of the run; non-finite values are results too).
    pub fn metric(&mut self, name: impl Into<String>, value: f64) {
        self.metrics.insert(name.into(), value);
    }

    /// Records several metrics at once.
    pub fn metrics_from<K: Into<String>>(&mut self, values: impl IntoIterator<Item = (K, f64)>) {
        for (k, v) in values {
            self.metric(k, v);
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Replaces the metrics wholesale (an op that reads them back from its command).
    pub fn set_metrics(&mut self, metrics: Metrics) {
        self.metrics = metrics;
    }

    /// Writes the metrics recorded so far to [`METRICS_FILE`].
    pub fn write_metrics_file(&self) -> Result<(), OpError> {
        write_metrics(self.dir, &self.metrics)
    }

    pub(crate) fn into_metrics(self) -> Metrics {
        self.metrics
    }
}

/// Writes `value` to `path` as pretty JSON (deterministic for equal values, so equal results
/// hash equal).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), OpError> {
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| OpError::Failed(format!("cannot encode {name}: {e}")))?;
    std::fs::write(path, text)
        .map_err(|e| OpError::io(format!("cannot write {}", path.display()), e))
}

/// `metrics` as [`METRICS_FILE`] in `dir`, without non-finite values and timings (`*time_s`),
/// which would make equal runs differ.
pub fn write_metrics(dir: &Path, metrics: &Metrics) -> Result<(), OpError> {
    let flat: BTreeMap<&str, f64> = metrics
        .iter()
        .filter(|(k, v)| v.is_finite() && !k.ends_with("time_s"))
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    write_json(&dir.join(METRICS_FILE), &flat)
}

/// The JSON in `path`, `None` when the file does not exist; an unreadable or invalid file is an
/// error naming it.
pub fn read_json(path: &Path) -> Result<Option<Value>, OpError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| OpError::Failed(format!("{} is not valid JSON: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(OpError::io(format!("cannot read {}", path.display()), e)),
    }
}

/// A matrix label, `k=v,k=v` in plan order: how a list input (`stage[*]`) names its items.
/// Values may contain commas: a segment without a `name=` prefix continues the previous value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Label(Vec<(String, String)>);

impl Label {
    /// A label from (name, rendered value) pairs, in order.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Label(pairs.into_iter().collect())
    }

    pub fn parse(text: &str) -> Self {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for segment in text.split(',') {
            match segment.split_once('=') {
                Some((k, v)) if is_label_key(k) => pairs.push((k.to_string(), v.to_string())),
                _ => {
                    if let Some(last) = pairs.last_mut() {
                        last.1.push(',');
                        last.1.push_str(segment);
                    }
                }
            }
        }
        Label(pairs)
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// A matrix variable name as the planner allows it.
fn is_label_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_with_commas_in_values() {
        let label = Label::parse("arch=1,2,3,seed=0,lr=0.1");
        assert_eq!(label.get("arch"), Some("1,2,3"));
        assert_eq!(label.get("seed"), Some("0"));
        assert_eq!(label.get("lr"), Some("0.1"));
        assert_eq!(label.get("x"), None);
        assert_eq!(label.to_string(), "arch=1,2,3,seed=0,lr=0.1");
        assert_eq!(Label::parse(""), Label::default());
    }

    #[test]
    fn metrics_file_leaves_out_non_finite_values_and_timings() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Outputs::new(dir.path());
        out.metric("loss", f64::NAN);
        out.metric("acc", 0.5);
        out.metric("epoch_time_s", 3.0);
        out.write_metrics_file().unwrap();
        let v = read_json(&dir.path().join(METRICS_FILE)).unwrap().unwrap();
        assert_eq!(v, serde_json::json!({"acc": 0.5}));
        assert_eq!(read_json(&dir.path().join("missing.json")).unwrap(), None);
    }
}
