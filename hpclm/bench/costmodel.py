"""The ring allreduce's latency/bandwidth (alpha-beta) model: fit it to measured times, predict other
ring sizes. Pure numpy: t(S) = 2(n-1)*alpha + 2(n-1)/n * S / B on n ranks for S bytes."""
from __future__ import annotations

import numpy as np


def allreduce_bus_factor(n: int) -> float:
    """nccl-tests' busbw = algbw * 2(n-1)/n: the share of the data each rank's link carries."""
    return 2 * (n - 1) / n


def fit_ring_model(points: list[tuple[int, float]], n: int) -> dict | None:
    """Fit t(S) = 2(n-1)*alpha + 2(n-1)/n * S / B to (size bytes, seconds) points, minimizing
    relative error so that small and large sizes count alike. alpha: seconds per ring step;
    B: bytes/s per link. None when there is nothing to fit (n < 2 or fewer than 2 sizes)."""
    points = [(size, t) for size, t in points if t and t > 0 and size > 0]
    if n < 2 or len({size for size, _ in points}) < 2:
        return None
    steps = 2 * (n - 1)
    a = np.array([[steps / t, steps / n * size / t] for size, t in points])
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones(len(points)), rcond=None)
    if beta <= 0:
        return None
    if alpha < 0:  # latency below resolution: bandwidth term alone
        x = a[:, 1]
        alpha, beta = 0.0, float(x.sum() / (x * x).sum())
    return {"alpha_s": float(alpha), "beta_s_per_byte": float(beta), "link_bytes_per_s": 1.0 / float(beta)}


def ring_time(model: dict, n: int, size: float) -> float:
    return 2 * (n - 1) * model["alpha_s"] + 2 * (n - 1) / n * size * model["beta_s_per_byte"]


def crossover_bytes(model: dict, n: int) -> float:
    """Message size at which the ring's latency and bandwidth terms are equal: n * alpha / beta."""
    return n * model["alpha_s"] / model["beta_s_per_byte"]


PREDICT_RANKS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def predictions(model: dict, sizes: list[int]) -> list[dict]:
    out = []
    for n in PREDICT_RANKS:
        entry = {"ranks": n, "crossover_bytes": crossover_bytes(model, n)}
        for size in sizes:
            t = ring_time(model, n, size)
            entry[str(size)] = {"time_us": t * 1e6, "busbw": size / t / 1e9 * allreduce_bus_factor(n)}
        out.append(entry)
    return out
