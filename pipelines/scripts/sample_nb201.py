#!/usr/bin/env python3
"""A seeded sample of NAS-Bench-201 cells, printed as a YAML list for nb201_rerank.yaml's and
teg_nas.yaml's `vars.archs`. Usage: sample_nb201.py SEED COUNT [SKIP]

Cells are six digits (edges 1<-0 | 2<-0 2<-1 | 3<-0 3<-1 3<-2; 0 none, 1 skip, 2 conv1x1,
3 conv3x3, 4 avgpool3x3) written "d_dd_ddd", uniform over the 15,625 cells, keeping only cells
with an input->output path and no repeats. The order is the draw order, so `COUNT + k` starts
with the same COUNT cells: growing the list adds architectures and trains only the new ones.
SKIP > 0 prints only the cells after the first SKIP (to append to an existing list).

"""
import random
import sys


def connected(d):
    # d: [e10, e20, e21, e30, e31, e32]
    reach = {0}
    edges = {(1, 0): d[0], (2, 0): d[1], (2, 1): d[2], (3, 0): d[3], (3, 1): d[4], (3, 2): d[5]}
    for t in (1, 2, 3):
        if any(edges[(t, s)] != 0 and s in reach for s in range(t)):
            reach.add(t)
    return 3 in reach


def sample(seed, count):
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < count:
        d = [rng.randrange(5) for _ in range(6)]
        s = f"{d[0]}_{d[1]}{d[2]}_{d[3]}{d[4]}{d[5]}"
        if s in seen or not connected(d):
            continue
        seen.add(s)
        out.append(s)
    return out


if __name__ == "__main__":
    seed, count = int(sys.argv[1]), int(sys.argv[2])
    skip = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    for s in sample(seed, count)[skip:]:
        print(f'    - "{s}"')
