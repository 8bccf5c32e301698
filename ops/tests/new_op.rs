//! The op of ARCHITECTURE.md's "Adding an op", compiled and run here so that text stays true.

use ops::{Count, OpError, Outputs, ParamError, RunContext, TypedOp};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Params as written in the pipeline; every field's doc is what `engine ops` prints.
#[derive(Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ConstantParams {
    /// How many values to write (at least 1).
    pub n: Count,
    /// The value written.
    pub value: f64,
}
impl Default for ConstantParams {
    fn default() -> Self {
        Self {
            n: Count(4),
            value: 1.0,
        }
    }
}

pub struct ConstantOp;
impl TypedOp for ConstantOp {
    const NAME: &'static str = "data.constant";
    const VERSION: u32 = 1; // bump when results for the same params could change
    const SUMMARY: &'static str = "n copies of a value";
    type Params = ConstantParams;
    type Config = ConstantParams;
    fn resolve(p: ConstantParams) -> Result<ConstantParams, ParamError> {
        if !p.value.is_finite() {
            return Err(ParamError::new("value", "must be a finite number"));
        }
        Ok(p)
    }
    fn run(
        &self,
        p: &ConstantParams,
        ctx: &mut RunContext<'_>,
        out: &mut Outputs<'_>,
    ) -> Result<(), OpError> {
        ctx.check_cancelled()?;
        out.write_json("values.json", &vec![p.value; p.n.get()])?;
        out.metric("sum", p.value * p.n.get() as f64);
        out.write_metrics_file()
    }
}

#[test]
fn the_worked_example_plans_runs_and_refuses_bad_params() {
    let output =
        ops::testing::OpRun::new(serde_json::json!({"n": 3, "value": 2.0})).run(&ConstantOp);
    assert_eq!(output.metrics()["sum"], 6.0);
    let values = std::fs::read_to_string(output.out_dir.join("values.json")).unwrap();
    assert_eq!(serde_json::from_str::<Vec<f64>>(&values).unwrap(), [2.0; 3]);
    let zero = ops::testing::OpRun::new(serde_json::json!({"n": 0})).run(&ConstantOp);
    let err = zero.result.unwrap_err().to_string();
    assert!(err.contains("'n'") && err.contains("at least 1"), "{err}");
}

#[test]
fn architecture_md_shows_this_code() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let this = std::fs::read_to_string(root.join("ops/tests/new_op.rs")).unwrap();
    let start = doc
        .find("```rust\n")
        .expect("a rust block in ARCHITECTURE.md")
        + 8;
    let end = start + doc[start..].find("```").unwrap();
    assert!(
        this.contains(&doc[start..end]),
        "ARCHITECTURE.md's worked example differs from ops/tests/new_op.rs; copy one to the other"
    );
}
