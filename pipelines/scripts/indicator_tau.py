#!/usr/bin/env python3
"""One row of teg_nas's Kendall-tau table as metrics (`tau`, `n`, and `se`, its bootstrap standard error): argv[1] names an indicator
of the search (`ntk`, `regions`, `generalization`, `naswot`) or `rank_sum` (their rank-sum
combination). Reads $ENGINE_IN_CORRELATE/correlate.json (an `indicators.correlate` result).
Signs are as computed there: tau of the raw indicator value with accuracy (kappa and G are
lower-is-better, so agreement shows as a negative tau; rank_sum is tau of minus the rank sum,
so agreement is positive). An undefined tau (fewer than two cells scored) is an error."""
import json
import os
import sys

name = sys.argv[1]
with open(os.path.join(os.environ["ENGINE_IN_CORRELATE"], "correlate.json")) as f:
    c = json.load(f)
if name == "rank_sum":
    entry = c["tau_rank_sum"]
elif name in c["tau"]:
    entry = c["tau"][name]
else:
    sys.exit(f"correlate.json has no indicator {name!r}; it has {sorted(c['tau'])} and rank_sum")
if entry["tau"] is None:
    sys.exit(f"tau of {name} is undefined over {entry['n']} cell(s); train more cells")
out = {"tau": entry["tau"], "n": entry["n"]}
if entry.get("se") is not None:
    out["se"] = entry["se"]
with open(os.path.join(os.environ["ENGINE_OUT"], "metrics.json"), "w") as f:
    json.dump(out, f)
print(json.dumps(out))
