#!/usr/bin/env python3
"""One (predicted or probed) LR of an lr.pick result as metric `lr`, so that a report plot can
draw both as series over the same x axis. argv[1]: `predicted` or `probed`."""
import json
import os
import sys

source = sys.argv[1]
with open(os.path.join(os.environ["ENGINE_IN_PICK"], "metrics.json")) as f:
    m = json.load(f)
key = {"predicted": "lr_predicted", "probed": "lr_star"}[source]
with open(os.path.join(os.environ["ENGINE_OUT"], "metrics.json"), "w") as f:
    json.dump({"lr": m[key]}, f)
