"""numpy/scipy reference for `pde.generate`'s benchmark: the same 64x64 Poisson generator and
the same Navier-Stokes scheme (operator-learning note, section 1), written the way numpy code is
written well: batched over samples, real FFTs (scipy.fft), no Python loops over grid points.
Parallel over samples with a process pool of --threads workers (numpy's FFT is single-threaded).

Prints one JSON object with samples/s and steps/s; bench/pde/run.sh compares it with the Rust
harness (ops/examples/pde_bench.rs).
"""

import argparse
import json
import os
import time
from multiprocessing import Pool

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import scipy.fft as sfft  # noqa: E402

LATTICE, SPACING, SIGMA = 12, 1.0 / 16.0, 1.0 / 32.0
VF = np.array([0.2, 0.4, 0.6, 0.8])


def wavenumbers(n):
    k = np.fft.fftfreq(n, 1.0 / n)
    kd = k.copy()
    if n % 2 == 0:
        kd[n // 2] = 0.0  # first derivatives vanish at Nyquist (same as the Rust solver)
    return k, kd


# Note section 1, Poisson: bump source (12x12 lattice, sigma 1/32, separable), K = R(-t) diag(1,e) R(t),
# u_hat = f_hat / (0.01 4 pi^2 (K11 kx^2 + K22 ky^2 + 2 K12 kx ky)). Returns x [B,4,n,n], y [B,1,n,n].
def poisson_batch(first_index, count, n, seed, labeled, e_range=(1.0, 20.0)):
    rng = np.random.default_rng([seed, first_index])
    idx = np.arange(first_index, first_index + count)
    e = rng.uniform(*e_range, count)
    theta = rng.uniform(0.0, 2 * np.pi, count)
    vf = VF[idx % 4]
    on = rng.random((count, LATTICE * LATTICE)) < (1.0 - vf)[:, None]
    amp = rng.uniform(1e-3, 1.0, (count, LATTICE * LATTICE))
    none = ~on.any(axis=1)
    on[none, rng.integers(0, LATTICE * LATTICE, none.sum())] = True
    a = np.where(on, amp, 0.0).reshape(count, LATTICE, LATTICE)
    centres = 0.5 + (np.arange(LATTICE) - (LATTICE - 1) / 2) * SPACING
    d = np.arange(n)[None, :] / n - centres[:, None]
    d -= np.round(d)
    g = np.exp(-d * d / (2 * SIGMA * SIGMA))  # [12, n]
    f = np.einsum("my,bmk,kx->byx", g, a, g, optimize=True)
    f /= f.max(axis=(1, 2), keepdims=True)
    f -= f.mean(axis=(1, 2), keepdims=True)
    c, s = np.cos(theta), np.sin(theta)
    k11, k22, k12 = c * c + e * s * s, s * s + e * c * c, (e - 1.0) * s * c
    x = np.empty((count, 4, n, n), np.float32)
    x[:, 0] = f
    for ch, kv in enumerate((k11, k22, k12), start=1):
        x[:, ch] = (0.01 * kv)[:, None, None]
    if not labeled:
        return x, None
    k, kd = wavenumbers(n)
    kr = k[: n // 2 + 1].copy()
    kr[-1] = abs(kr[-1])  # rfft's last bin is the Nyquist (+n/2)
    krd = kd[: n // 2 + 1]
    ky, kx = k[:, None], kr[None, :]
    kyd, kxd = kd[:, None], krd[None, :]
    sym = 0.01 * 4 * np.pi**2 * (
        k11[:, None, None] * kx**2 + k22[:, None, None] * ky**2 + 2 * k12[:, None, None] * kxd * kyd
    )
    sym[:, 0, 0] = 1.0
    fh = sfft.rfft2(f)
    uh = fh / sym
    uh[:, 0, 0] = 0.0
    u = sfft.irfft2(uh, s=(n, n))
    u -= u.mean(axis=(1, 2), keepdims=True)
    return x, u[:, None].astype(np.float32)


class Kolmogorov:
    """Note section 1, NS: pseudo-spectral vorticity on [0, 2pi)^2, 2/3 dealiasing,
    Crank-Nicolson diffusion + Heun advection, forcing -4 cos(4y). Real FFTs, batched."""

    def __init__(self, n):
        k, kd = wavenumbers(n)
        self.n = n
        kr = np.abs(k[: n // 2 + 1])
        self.kx = kd[: n // 2 + 1][None, :] * np.ones((n, 1))
        self.ky = kd[:, None] * np.ones((1, n // 2 + 1))
        self.k2 = kr[None, :] ** 2 + k[:, None] ** 2
        self.inv_k2 = np.where(self.k2 > 0, 1.0 / np.where(self.k2 > 0, self.k2, 1.0), 0.0)
        self.dealias = ((3 * kr[None, :] <= n) & (3 * np.abs(k[:, None]) <= n)).astype(float)
        y = 2 * np.pi * np.arange(n) / n
        self.f_hat = sfft.rfft2(-4.0 * np.cos(4.0 * y)[:, None] * np.ones((1, n)))

    def advection(self, wh):
        psi = wh * self.inv_k2
        u = sfft.irfft2(1j * self.ky * psi, s=(self.n, self.n))
        v = sfft.irfft2(-1j * self.kx * psi, s=(self.n, self.n))
        wx = sfft.irfft2(1j * self.kx * wh, s=(self.n, self.n))
        wy = sfft.irfft2(1j * self.ky * wh, s=(self.n, self.n))
        return sfft.rfft2(u * wx + v * wy) * self.dealias

    def step(self, wh, nu, dt):
        half = 0.5 * dt * nu * self.k2
        a = self.advection(wh)
        pred = ((1 - half) * wh - dt * a + dt * self.f_hat) / (1 + half)
        a2 = self.advection(pred)
        return ((1 - half) * wh - 0.5 * dt * (a + a2) + dt * self.f_hat) / (1 + half)


# Note section 1, NS: w0 ~ GRF(alpha 2.5, tau 3) on [0, 2pi)^2, then `steps` steps. [B, n, n].
def ns_batch(first_index, count, n, seed, steps, re=1000.0, dt=1e-3):
    rng = np.random.default_rng([seed, first_index])
    k, _ = wavenumbers(n)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    alpha, tau = 2.5, 3.0
    amp = tau ** (alpha - 1) * (k2 + tau * tau) ** (-alpha / 2)
    amp[0, 0] = 0.0
    coeff = (rng.standard_normal((count, n, n)) + 1j * rng.standard_normal((count, n, n))) * amp
    w0 = np.real(np.fft.ifft2(coeff * n * n))
    grid = Kolmogorov(n)
    wh = sfft.rfft2(w0)
    for _ in range(steps):
        wh = grid.step(wh, 1.0 / re, dt)
    return sfft.irfft2(wh, s=(n, n)).astype(np.float32)


# Generated arrays stay alive in the worker, as the Rust generator keeps its whole dataset in
# memory (the op writes it out at the end); reset per timed run.
KEPT = []


def _reset(_):
    KEPT.clear()
    return 0


def _poisson_job(a):
    KEPT.append(poisson_batch(*a))
    return KEPT[-1][0].shape[0]


def _ns_job(a):
    KEPT.append(ns_batch(*a))
    return KEPT[-1].shape[0]


def timed(pool, job, jobs, repeats):
    best = float("inf")
    for _ in range(repeats):
        list(pool.map(_reset, range(64))) if pool else _reset(0)
        t = time.perf_counter()
        list(pool.map(job, jobs)) if pool else [job(j) for j in jobs]
        best = min(best, time.perf_counter() - t)
    return best


def chunks(total, parts):
    size = -(-total // parts)
    return [(s, min(size, total - s)) for s in range(0, total, size)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--poisson-samples", type=int, default=2048)
    p.add_argument("--poisson-batch", type=int, default=64)
    p.add_argument("--ns-samples", type=int, default=16)
    p.add_argument("--ns-steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    n, seed = a.resolution, 0
    pool = Pool(a.threads) if a.threads > 1 else None
    pj = [
        (s, c, n, seed, labeled)
        for labeled in (True,)
        for s, c in chunks(a.poisson_samples, max(a.threads, a.poisson_samples // a.poisson_batch))
    ]
    t_lab = timed(pool, _poisson_job, pj, a.repeats)
    pj_un = [(s, c, n, seed, False) for (s, c, _, _, _) in pj]
    t_unlab = timed(pool, _poisson_job, pj_un, a.repeats)
    nj = [(s, c, n, seed, a.ns_steps) for s, c in chunks(a.ns_samples, a.threads)]
    t_ns = timed(pool, _ns_job, nj, a.repeats)
    if pool:
        pool.close()
    print(
        json.dumps(
            {
                "impl": "numpy",
                "numpy": np.__version__,
                "scipy": __import__("scipy").__version__,
                "threads": a.threads,
                "resolution": n,
                "poisson_samples": a.poisson_samples,
                "poisson_labeled_samples_per_s": a.poisson_samples / t_lab,
                "poisson_unlabeled_samples_per_s": a.poisson_samples / t_unlab,
                "ns_samples": a.ns_samples,
                "ns_steps": a.ns_steps,
                "ns_steps_per_s": a.ns_samples * a.ns_steps / t_ns,
            }
        )
    )


if __name__ == "__main__":
    main()
