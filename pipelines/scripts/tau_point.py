#!/usr/bin/env python3
"""One point of rerank's tau-vs-top-K% curve as metrics (`tau`, `seed_tau`, `n`), so a report
table and plot can put K on an axis. argv[1]: K. Reads $ENGINE_IN_RERANK/rerank.json; a tau
that is undefined (fewer than two cells in the top K%) is an error naming the fix."""
import json
import os
import sys

k = float(sys.argv[1])
with open(os.path.join(os.environ["ENGINE_IN_RERANK"], "rerank.json")) as f:
    rerank = json.load(f)
point = next((c for c in rerank["curve"] if abs(c["k"] - k) < 1e-9), None)
if point is None:
    sys.exit(f"rerank.json has no top-{k}% point; add {k} to rerank's top_k")
if point["tau"] is None:
    sys.exit(
        f"top {k}% holds {point['n']} cell(s): tau needs two or more; "
        "drop this K from vars.top_k_table or sample more cells"
    )
out = {"tau": point["tau"], "n": point["n"]}
if point.get("seed_tau") is not None:
    out["seed_tau"] = point["seed_tau"]
with open(os.path.join(os.environ["ENGINE_OUT"], "metrics.json"), "w") as f:
    json.dump(out, f)
print(json.dumps(out))
