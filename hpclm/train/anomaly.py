"""Loss spikes and stragglers, judged from figures every rank holds alike, so every rank decides alike.

SpikeDetector: each step's rank-averaged loss against a moving window of the steps before it. A step is
an anomaly when its loss (or, without a loss scaler, its gradient norm) is not finite, or when the loss
is above both anomaly.spike_ratio x the window's mean and the mean + anomaly.spike_sigmas x its standard
deviation, once the window holds anomaly.min_window steps. Anomalous losses never join the window.
Anomalies closer together than anomaly.window steps count as one streak; a streak longer than
anomaly.max_rollbacks stops the run. Its state is part of every checkpoint, so a resumed run judges
exactly as the uninterrupted one.

StragglerWatch: each rank's compute time per step (forward and backward, not the gradient exchange it
waits in), gathered every log interval; a rank slower than anomaly.straggler_ratio x the median of the
other ranks for anomaly.straggler_intervals intervals in a row is named once.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class SpikeDetector:
    window: int
    min_window: int
    ratio: float
    sigmas: float
    max_streak: int
    losses: list = field(default_factory=list)
    streak: int = 0
    streak_until: int = -1  # the last step an anomaly extends the current streak to
    history: list = field(default_factory=list)  # every anomaly: {"step", "action", "why", ...}

    @classmethod
    def from_config(cls, a) -> "SpikeDetector":
        return cls(a.window, a.min_window, a.spike_ratio, a.spike_sigmas, a.max_rollbacks)

    def judge(self, loss: float, norm_finite: bool = True) -> str | None:
        """None for a normal step (its loss joins the window), else why the step is an anomaly."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if not norm_finite:
            return "the gradient norm is not finite"
        if len(self.losses) >= self.min_window:
            mean, sd = statistics.fmean(self.losses), statistics.pstdev(self.losses)
            if loss > self.ratio * mean and loss > mean + self.sigmas * sd:
                return (f"the loss {loss:.4g} is {loss / mean:.1f}x the mean {mean:.4g} of the {len(self.losses)} "
                        f"steps before (sd {sd:.2g})")
        self.losses.append(loss)
        del self.losses[:-self.window]
        return None

    def note(self, step: int, entry: dict) -> bool:
        """Record an anomaly at `step` (the step it would have completed); False once the streak is too long."""
        self.streak = self.streak + 1 if step <= self.streak_until else 1
        self.streak_until = step + self.window
        self.history.append({"step": step, "streak": self.streak, **entry})
        return self.streak <= self.max_streak

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "streak": self.streak, "streak_until": self.streak_until,
                "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.losses = list(state.get("losses", []))
        self.streak, self.streak_until = int(state.get("streak", 0)), int(state.get("streak_until", -1))
        self.history = [dict(h) for h in state.get("history", [])]


@dataclass
class StragglerWatch:
    ratio: float
    intervals: int
    slow_for: dict = field(default_factory=dict)  # rank -> log intervals in a row it was slow
    named: set = field(default_factory=set)

    def observe(self, compute_s: list[float]) -> list[tuple[int, float]]:
        """Per-rank compute seconds per step over one log interval -> the (rank, ratio) pairs to name now."""
        out = []
        for rank, t in enumerate(compute_s):
            others = [x for i, x in enumerate(compute_s) if i != rank]
            median = statistics.median(others) if others else 0.0
            ratio = t / median if median > 0 else 1.0
            self.slow_for[rank] = self.slow_for.get(rank, 0) + 1 if ratio > self.ratio else 0
            if self.slow_for[rank] >= self.intervals and rank not in self.named:
                self.named.add(rank)
                out.append((rank, ratio))
        return out

    def slowest(self) -> int:
        """The rank that has been slow the most intervals in a row (-1: none is slow)."""
        rank, count = max(self.slow_for.items(), key=lambda kv: kv[1], default=(-1, 0))
        return rank if count else -1
