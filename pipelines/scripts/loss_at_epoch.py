#!/usr/bin/env python3
"""The training loss after epoch argv[1], averaged over the train results (seeds) under
$ENGINE_IN_RUNS (each with history.json), as metric `train_loss`; so a report plot can draw
loss-vs-epoch curves with one series per cell."""
import json
import os
import sys

epoch = int(sys.argv[1])
root = os.environ["ENGINE_IN_RUNS"]
losses = []
for label in sorted(os.listdir(root)):
    with open(os.path.join(root, label, "history.json")) as f:
        history = json.load(f)
    row = next((r for r in history if r["epoch"] == epoch), None)
    if row is None:
        sys.exit(f"{label}: no epoch {epoch} in history.json (diverged or fewer epochs)")
    losses.append(row["train_loss"])
with open(os.path.join(os.environ["ENGINE_OUT"], "metrics.json"), "w") as f:
    json.dump({"train_loss": sum(losses) / len(losses), "runs": len(losses)}, f)
