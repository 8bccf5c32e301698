#!/usr/bin/env python3
"""Kendall tau-b between As-ViT's training-free scores and trained accuracy (asvit.md §5).

Reads $ENGINE_IN_SEARCH/search.json (a `search` with `space: vit`: trajectory[i].values holds
length_distortion and ntk) and every `train` result under $ENGINE_IN_RUNS (one folder per matrix
instance, named like `i=3`: the trajectory index the run trained through `model_from`), each
with metrics.json holding the accuracy named by argv[1] (default test_accuracy). Writes
$ENGINE_OUT/metrics.json: tau_length_distortion (L_E vs accuracy; higher L_E is better, so
positive = agreement), tau_ntk (minus kappa vs accuracy, positive = agreement), n; and
points.json with every (index, label, scores, accuracy). A tau that is undefined (fewer than two
runs, or constant values) is an error naming the fix.
"""
import json
import os
import sys


def kendall_tau_b(x, y):
    n = len(x)
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = ((conc + disc + tx) * (conc + disc + ty)) ** 0.5
    return None if denom == 0 else (conc - disc) / denom


def main():
    metric = sys.argv[1] if len(sys.argv) > 1 else "test_accuracy"
    with open(os.path.join(os.environ["ENGINE_IN_SEARCH"], "search.json")) as f:
        search = json.load(f)
    if search.get("space") != "vit":
        sys.exit("input `search` is not a `space: vit` search")
    traj = search["trajectory"]
    root = os.environ["ENGINE_IN_RUNS"]
    points = []
    for label in sorted(os.listdir(root)):
        keys = dict(kv.split("=", 1) for kv in label.split(",") if "=" in kv)
        if "i" not in keys:
            sys.exit(f"run folder {label}: no matrix key `i` (the trajectory index)")
        i = int(keys["i"])
        if i >= len(traj):
            sys.exit(f"run {label}: the search scored only {len(traj)} topologies")
        with open(os.path.join(root, label, "metrics.json")) as f:
            m = json.load(f)
        if metric not in m:
            sys.exit(f"run {label}: no `{metric}` in metrics.json")
        v = traj[i]["values"]
        points.append(
            {
                "index": i,
                "label": traj[i]["label"],
                "length_distortion": v.get("length_distortion"),
                "ntk": v.get("ntk"),
                "accuracy": m[metric],
            }
        )
    out = {"n": len(points)}
    for name, sign in (("length_distortion", 1.0), ("ntk", -1.0)):
        pts = [p for p in points if p[name] is not None]
        if not pts:
            continue
        tau = kendall_tau_b([sign * p[name] for p in pts], [p["accuracy"] for p in pts])
        if tau is None:
            sys.exit(f"tau of {name} is undefined over {len(pts)} runs; train more topologies")
        out[f"tau_{name}"] = tau
    with open(os.path.join(os.environ["ENGINE_OUT"], "metrics.json"), "w") as f:
        json.dump(out, f)
    with open(os.path.join(os.environ["ENGINE_OUT"], "points.json"), "w") as f:
        json.dump(points, f, indent=1)
    print(json.dumps(out))


main()
