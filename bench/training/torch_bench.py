"""PyTorch (CPU) equivalents of the models in ops/examples/train_bench.rs, layer by layer.

Same batch, shapes, parameter counts, losses and optimiser settings as the Rust harness;
one fixed random batch, `steps` timed training steps after `--warmup` untimed ones.
Prints one JSON object (steps/s, peak RSS from /proc/self/status VmHWM).

    python torch_bench.py <mlp|nb201|fno2d> <steps> [--warmup 3] [--threads 2]

Definitions mirrored (Rust sources):
- mlp: nn/src/models/dag.rs `MlpDag` + `eval_cell`
- nb201: nn/src/models/nb201.rs (`Cell`, `ReductionBlock`, `Nb201`), layers/pool.rs
- fno2d: nn/src/models/fno.rs, layers/spectral.rs
"""

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def proc_status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    return None


# ---------------------------------------------------------------- cell DAGs (topology.rs)

def parse_digits(s):
    """'2_12_012' -> rows: ops[t-1][s] is the op code of edge s -> t."""
    return [[int(ch) for ch in g] for g in s.split("_")]


NB201_OPS = ["none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]


def parse_nb201_arch(s):
    rows = []
    for t, group in enumerate(s.split("+")):
        row = [0] * (t + 1)
        for edge in group.strip("|").split("|"):
            name, src = edge.split("~")
            row[int(src)] = NB201_OPS.index(name)
        rows.append(row)
    return rows


def edges(rows):
    """(position, target, source, op) in string order, as Dag::edges."""
    pos = 0
    for t, row in enumerate(rows, start=1):
        for s, op in enumerate(row):
            yield pos, t, s, op
            pos += 1


def eval_cell(rows, x, edge):
    """z(0) = x, z(t) = sum of edge(z(s)) over existing edges; a node without inputs is 0."""
    values = [x]
    for t in range(1, len(rows) + 1):
        acc = None
        for s, op in enumerate(rows[t - 1]):
            if op != 0:
                pos = t * (t - 1) // 2 + s
                out = edge(pos, op, values[s])
                acc = out if acc is None else acc + out
        values.append(acc if acc is not None else torch.zeros_like(x))
    return values[-1]


# ---------------------------------------------------------------- mlp_dag (dag.rs)

class MlpDag(nn.Module):
    def __init__(self, topology, in_features, width, classes):
        super().__init__()
        self.rows = parse_digits(topology)
        self.stem = nn.Linear(in_features, width)
        self.edges = nn.ModuleDict(
            {str(p): nn.Linear(width, width) for p, _, _, op in edges(self.rows) if op == 2}
        )
        self.readout = nn.Linear(width, classes)

    def forward(self, x):
        z = F.relu(self.stem(x.flatten(1)))
        z = eval_cell(
            self.rows, z,
            lambda pos, op, v: F.relu(self.edges[str(pos)](v)) if op == 2 else v,
        )
        return self.readout(z)


# ---------------------------------------------------------------- nb201 (nb201.rs)

class ReLUConvBN(nn.Module):
    """ReLU -> Conv(no bias) -> BatchNorm (affine, momentum 0.1, eps 1e-5)."""

    def __init__(self, c_in, c_out, k, stride, padding):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return self.bn(self.conv(F.relu(x)))


class Cell(nn.Module):
    def __init__(self, rows, c):
        super().__init__()
        self.rows = rows
        convs = {}
        for pos, _, _, op in edges(rows):
            if op == 2:
                convs[str(pos)] = ReLUConvBN(c, c, 1, 1, 0)
            elif op == 3:
                convs[str(pos)] = ReLUConvBN(c, c, 3, 1, 1)
        self.edges = nn.ModuleDict(convs)

    def forward(self, x):
        def edge(pos, op, v):
            if op in (2, 3):
                return self.edges[str(pos)](v)
            if op == 4:
                return F.avg_pool2d(v, 3, stride=1, padding=1, count_include_pad=False)
            return v

        return eval_cell(self.rows, x, edge)


class ReductionBlock(nn.Module):
    """ReLUConvBN(3x3, stride 2) -> ReLUConvBN(3x3), plus AvgPool(2, 2) -> Conv1x1 (no BN)."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, 2, 1)
        self.conv_b = ReLUConvBN(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        skip = self.shortcut(F.avg_pool2d(x, 2, stride=2))
        return self.conv_b(self.conv_a(x)) + skip


class Nb201(nn.Module):
    def __init__(self, arch, c, n, in_channels, classes):
        super().__init__()
        rows = parse_nb201_arch(arch)
        self.stem = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(c)
        blocks = []
        for stage, width in enumerate([c, 2 * c, 4 * c]):
            if stage > 0:
                blocks.append(ReductionBlock(width // 2, width))
            blocks.extend(Cell(rows, width) for _ in range(n))
        self.blocks = nn.Sequential(*blocks)
        self.last_bn = nn.BatchNorm2d(4 * c)
        self.classifier = nn.Linear(4 * c, classes)

    def forward(self, x):
        z = self.blocks(self.stem_bn(self.stem(x)))
        z = F.relu(self.last_bn(z))
        return self.classifier(z.mean(dim=(2, 3)))


# ---------------------------------------------------------------- fno2d (fno.rs, spectral.rs)

class SpectralConv2d(nn.Module):
    """irfft2(W . rfft2(x)), ortho, modes kx in [0, m1) and [H - m1, H), ky in [0, m2).

    Weights (m2, 2 m1, c_in, c_out) as real/imaginary pairs, init (1 / (c_in c_out)) U[0, 1),
    the Rust layout (k < m1: kx = k; k >= m1: kx = H - 2 m1 + k).
    """

    def __init__(self, c_in, c_out, m1, m2):
        super().__init__()
        self.m1, self.m2 = m1, m2
        scale = 1.0 / (c_in * c_out)
        self.weight_re = nn.Parameter(scale * torch.rand(m2, 2 * m1, c_in, c_out))
        self.weight_im = nn.Parameter(scale * torch.rand(m2, 2 * m1, c_in, c_out))

    def forward(self, x):
        b, c, h, w = x.shape
        m1, m2 = self.m1, self.m2
        x_ft = torch.fft.rfft2(x, norm="ortho")  # (b, c, h, w // 2 + 1)
        weight = torch.complex(self.weight_re, self.weight_im)  # (m2, 2 m1, i, o)
        out_ft = torch.zeros(b, weight.shape[-1], h, w // 2 + 1, dtype=x_ft.dtype)
        out_ft[:, :, :m1, :m2] = torch.einsum("bixy,yxio->boxy", x_ft[:, :, :m1, :m2], weight[:, :m1])
        out_ft[:, :, h - m1:, :m2] = torch.einsum(
            "bixy,yxio->boxy", x_ft[:, :, h - m1:, :m2], weight[:, m1:]
        )
        return torch.fft.irfft2(out_ft, s=(h, w), norm="ortho")


class FourierLayer(nn.Module):
    def __init__(self, width, m1, m2):
        super().__init__()
        self.spectral = SpectralConv2d(width, width, m1, m2)
        self.pointwise = nn.Conv2d(width, width, 1)

    def forward(self, x):
        return self.spectral(x) + self.pointwise(x)


class Fno2d(nn.Module):
    """lift Conv1x1 -> L Fourier layers (GELU after all but the last) -> Conv1x1, GELU, Conv1x1."""

    def __init__(self, c_in, width, modes, layers, head_width, out_channels):
        super().__init__()
        self.lift = nn.Conv2d(c_in, width, 1)
        self.layers = nn.ModuleList(FourierLayer(width, *modes) for _ in range(layers))
        self.fc1 = nn.Conv2d(width, head_width, 1)
        self.fc2 = nn.Conv2d(head_width, out_channels, 1)

    def forward(self, x):
        z = self.lift(x)
        for i, layer in enumerate(self.layers):
            z = layer(z)
            if i + 1 < len(self.layers):
                z = F.gelu(z)
        return self.fc2(F.gelu(self.fc1(z))).flatten(1)


# ---------------------------------------------------------------- cases (train_bench.rs `case`)

def sgd(params, lr):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def case(name):
    if name == "mlp":
        return dict(model=MlpDag("2_12_012", 3072, 256, 10), input=(3, 32, 32), batch=128,
                    loss="ce", opt=lambda p: sgd(p, 0.05))
    if name == "nb201":
        arch = ("|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|"
                "+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|")
        return dict(model=Nb201(arch, 16, 1, 3, 10), input=(3, 32, 32), batch=64,
                    loss="ce", opt=lambda p: sgd(p, 0.1))
    if name == "fno2d":
        return dict(model=Fno2d(1, 32, (12, 12), 4, 128, 1), input=(1, 64, 64), batch=8,
                    loss="mse",
                    opt=lambda p: torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                                    weight_decay=1e-4))
    raise SystemExit(f"unknown model {name!r}; use mlp, nb201 or fno2d")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("steps", type=int)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    c = case(args.model)
    model = c["model"]
    model.train()
    opt = c["opt"](model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.rand((c["batch"], *c["input"]), generator=g) * 2 - 1
    if c["loss"] == "ce":
        y = torch.randint(0, 10, (c["batch"],), generator=g)
        loss_fn = F.cross_entropy
    else:
        # One output channel on the input grid (fno2d's out_channels = 1); not a forward pass,
        # so that nothing has touched activation memory before rss_before.
        per = c["input"][1] * c["input"][2]
        y = torch.rand((c["batch"], per), generator=g) * 2 - 1
        loss_fn = F.mse_loss
    rss_before = proc_status_mib("VmRSS:")

    def run(n):
        last = float("nan")
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            last = loss.item()
        return last

    first = run(args.warmup)
    start = time.perf_counter()
    last = run(args.steps)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "impl": "torch",
        "model": args.model,
        "batch": c["batch"],
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "warmup": args.warmup,
        "steps": args.steps,
        "seconds": seconds,
        "steps_per_s": args.steps / seconds,
        "rss_before_mib": rss_before,
        "peak_rss_mib": proc_status_mib("VmHWM:"),
        "loss_after_warmup": first,
        "loss_last": last,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }))


if __name__ == "__main__":
    main()
