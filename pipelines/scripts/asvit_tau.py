#!/usr/bin/env python3
"""Kendall tau-b between As-ViT's training-free scores and trained accuracy (arXiv 2202.11921
§5; docs/methods/asvit.md), with bootstrap standard errors and the seed-vs-seed tau of the
accuracies (runs labelled `i=3,seed=1`; accuracy averaged over seeds per topology).

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


def bootstrap_se(x, y, draws=1000):
    """Standard deviation of tau over resamples of the pairs with replacement (fixed seed)."""
    import random

    rng = random.Random(0x7A05)
    n, taus = len(x), []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        t = kendall_tau_b([x[i] for i in idx], [y[i] for i in idx])
        if t is not None:
            taus.append(t)
    if len(taus) < 2:
        return None
    m = sum(taus) / len(taus)
    return (sum((t - m) ** 2 for t in taus) / (len(taus) - 1)) ** 0.5


def main():
    metric = sys.argv[1] if len(sys.argv) > 1 else "test_accuracy"
    with open(os.path.join(os.environ["ENGINE_IN_SEARCH"], "search.json")) as f:
        search = json.load(f)
    if search.get("space") != "vit":
        sys.exit("input `search` is not a `space: vit` search")
    traj = search["trajectory"]
    root = os.environ["ENGINE_IN_RUNS"]
    # index -> seed -> accuracy (runs without a `seed` key count as seed "0").
    runs = {}
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
        runs.setdefault(i, {})[keys.get("seed", "0")] = m[metric]
    points = []
    for i, by_seed in sorted(runs.items()):
        v = traj[i]["values"]
        points.append(
            {
                "index": i,
                "label": traj[i]["label"],
                "length_distortion": v.get("length_distortion"),
                "ntk": v.get("ntk"),
                "accuracy": sum(by_seed.values()) / len(by_seed),
                "accuracy_by_seed": by_seed,
            }
        )
    out = {"n": len(points)}
    for name, sign in (("length_distortion", 1.0), ("ntk", -1.0)):
        pts = [p for p in points if p[name] is not None]
        if not pts:
            continue
        x, y = [sign * p[name] for p in pts], [p["accuracy"] for p in pts]
        tau = kendall_tau_b(x, y)
        if tau is None:
            sys.exit(f"tau of {name} is undefined over {len(pts)} runs; train more topologies")
        out[f"tau_{name}"] = tau
        out[f"tau_{name}_se"] = bootstrap_se(x, y)
    # The noise floor: tau between two seeds' accuracies over the topologies both trained,
    # the mean over seed pairs.
    seeds = sorted({s for p in points for s in p["accuracy_by_seed"]})
    pair_taus = []
    for a in range(len(seeds)):
        for b in range(a + 1, len(seeds)):
            both = [p for p in points if seeds[a] in p["accuracy_by_seed"] and seeds[b] in p["accuracy_by_seed"]]
            xa = [p["accuracy_by_seed"][seeds[a]] for p in both]
            xb = [p["accuracy_by_seed"][seeds[b]] for p in both]
            t = kendall_tau_b(xa, xb)
            if t is not None:
                if not pair_taus:
                    out["seed_tau_se"] = bootstrap_se(xa, xb)
                pair_taus.append(t)
    if pair_taus:
        out["seed_tau"] = sum(pair_taus) / len(pair_taus)
    with open(os.path.join(os.environ["ENGINE_OUT"], "metrics.json"), "w") as f:
        json.dump(out, f)
    with open(os.path.join(os.environ["ENGINE_OUT"], "points.json"), "w") as f:
        json.dump(points, f, indent=1)
    print(json.dumps(out))


main()
