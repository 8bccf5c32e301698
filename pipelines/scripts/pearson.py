#!/usr/bin/env python3
"""Pearson r between predicted and probed maximal LRs (arch-aware-hparams.md §4.1).

Reads every `lr.pick` result under $ENGINE_IN_PICKS (one folder per matrix instance, each with
metrics.json holding `lr_star` and `lr_predicted`) and writes $ENGINE_OUT/metrics.json:
pearson_r (on the LRs themselves, as the paper reports), pearson_r_log10 (on log10 LRs, the
grid's own scale), n, edge_picks (picks at the edge of the LR grid: their true maximum may lie
beyond it) and mean_abs_log10_ratio; and points.json with every (label, predicted, probed).
"""
import json
import math
import os
import sys


def pearson(x, y):
    n = len(x)
    # A constant variable has no correlation (tested exactly: the float sums below would
    # leave a rounding residue instead of zero).
    if n < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def main():
    root = os.environ["ENGINE_IN_PICKS"]
    points = []
    for label in sorted(os.listdir(root)):
        with open(os.path.join(root, label, "metrics.json")) as f:
            m = json.load(f)
        if "lr_predicted" not in m:
            sys.exit(f"{label}: no lr_predicted; give the lr.pick stage a `prediction` input")
        points.append(
            {
                "label": label,
                "predicted": m["lr_predicted"],
                "probed": m["lr_star"],
                "at_grid_edge": m.get("at_grid_edge", 0),
            }
        )
    pred = [p["predicted"] for p in points]
    probed = [p["probed"] for p in points]
    out = {"n": len(points), "edge_picks": sum(p["at_grid_edge"] for p in points)}
    r = pearson(pred, probed)
    r_log = pearson([math.log10(v) for v in pred], [math.log10(v) for v in probed])
    # A constant probed LR (every pick on one grid point) has no correlation: left out, not 0.
    if r is not None:
        out["pearson_r"] = r
    if r_log is not None:
        out["pearson_r_log10"] = r_log
    if points:
        out["mean_abs_log10_ratio"] = sum(
            abs(math.log10(b / a)) for a, b in zip(pred, probed)
        ) / len(points)
    dest = os.environ["ENGINE_OUT"]
    with open(os.path.join(dest, "metrics.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(dest, "points.json"), "w") as f:
        json.dump(points, f, indent=1)
    for p in points:
        print(f"{p['label']}: predicted {p['predicted']:.4g} probed {p['probed']:.4g}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
