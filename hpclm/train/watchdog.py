"""The hang watchdog: a thread per rank that ends the job when a training step (its collectives included)
runs longer than anomaly.hang_timeout_s, with a diagnosis instead of a silent wait until the time limit.

Every rank's thread writes a heartbeat, OUT/heartbeat/rank-R.json ({"step", "in_step", "step_s", "time"}),
about once a second. When this rank's current step has run past the timeout, the thread writes
OUT/hang/rank-R.txt (what every rank's heartbeat says, then every thread's Python stack through
faulthandler), prints one line naming the ranks that stopped sending heartbeats or never reached the
step, and exits the process with EXIT_HANG, which the launcher sees as a failed rank (mpirun then ends
the others; slurm/train.sbatch requeues, and the new run resumes from `latest`).

A stopped rank (SIGSTOP), one stuck in the kernel (an NFS read) or a dead one sends no heartbeat: its
file ages. A live rank waiting in the same step's allreduce has a fresh heartbeat and in_step true.
The timeout (0: automatic) is max(300 s, 20 x the median of the recent step times).
"""
from __future__ import annotations

import faulthandler
import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

from hpclm import atomic

EXIT_HANG = 76
HEARTBEAT_DIR = "heartbeat"
HANG_DIR = "hang"
AUTO_FLOOR_S, AUTO_FACTOR = 300.0, 20.0


class HangWatchdog:
    def __init__(self, out: str | Path, rank: int, size: int, timeout_s: float = 0.0, period_s: float = 1.0):
        self.out, self.rank, self.size = Path(out), rank, size
        self.fixed_timeout = timeout_s
        self.period = period_s
        self.step, self.in_step, self.since = 0, False, time.monotonic()
        self.recent = deque(maxlen=100)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hpclm-hang-watchdog", daemon=True)
        (self.out / HEARTBEAT_DIR).mkdir(parents=True, exist_ok=True)

    def timeout(self) -> float:
        if self.fixed_timeout > 0:
            return self.fixed_timeout
        median = statistics.median(self.recent) if self.recent else 0.0
        return max(AUTO_FLOOR_S, AUTO_FACTOR * median)

    def start(self) -> "HangWatchdog":
        self._beat()
        self._thread.start()
        return self

    def step_started(self, step: int) -> None:
        self.step, self.since, self.in_step = step, time.monotonic(), True

    def step_done(self) -> None:
        self.recent.append(time.monotonic() - self.since)
        self.in_step = False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _heartbeat(self, rank: int) -> Path:
        return self.out / HEARTBEAT_DIR / f"rank-{rank}.json"

    def _beat(self) -> None:
        atomic.write_text(self._heartbeat(self.rank), json.dumps(
            {"step": self.step, "in_step": self.in_step, "step_s": time.monotonic() - self.since if self.in_step else 0.0,
             "time": time.time(), "pid": os.getpid()}))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._beat()
            except OSError:
                pass  # a full or vanished OUT must not end training; the next beat tries again
            if self.in_step and time.monotonic() - self.since > self.timeout():
                self._abort()

    def diagnosis(self) -> tuple[list[str], list[int]]:
        """A line per rank from its heartbeat, and the ranks that look stopped or behind."""
        now, lines, suspects = time.time(), [], []
        # stale: older than 5 beats, but under a timeout shorter than 10 s no more than half of it, so that a rank
        # stopped when the step began (its heartbeat as old as the step) reads as stopped when the timeout ends it
        stale_after = min(max(5 * self.period, 3.0), max(2 * self.period, self.timeout() / 2))
        for r in range(self.size):
            try:
                beat = json.loads(self._heartbeat(r).read_text())
            except (OSError, ValueError):
                lines.append(f"rank {r}: no heartbeat file (never started, or OUT is not shared with it)")
                suspects.append(r)
                continue
            age = now - beat["time"]
            where = f"step {beat['step'] + 1}" + (f", in it for {beat['step_s']:.0f} s" if beat["in_step"] else ", between steps")
            if age > stale_after:
                lines.append(f"rank {r}: no heartbeat for {age:.0f} s (last at {where}): stopped, stuck in the kernel, or dead")
                suspects.append(r)
            elif beat["step"] < self.step:
                lines.append(f"rank {r}: alive but behind, at {where}")
                suspects.append(r)
            else:
                lines.append(f"rank {r}: alive, at {where}" + (" (waiting for the others)" if beat["in_step"] else ""))
        return lines, suspects

    def _abort(self) -> None:
        elapsed = time.monotonic() - self.since
        lines, suspects = self.diagnosis()
        folder = self.out / HANG_DIR
        path = folder / f"rank-{self.rank}.txt"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"rank {self.rank}: step {self.step + 1} has run {elapsed:.0f} s, past the hang timeout of "
                        f"{self.timeout():.0f} s\n" + "".join(f"{line}\n" for line in lines) + "\nPython stacks:\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            path = None
        named = (f"rank(s) {', '.join(map(str, suspects))} sent no heartbeat or fell behind" if suspects
                 else "every rank is alive and in the step (a collective that never completes)")
        print(f"hpclm train: hang: rank {self.rank}'s step {self.step + 1} has run {elapsed:.0f} s (anomaly.hang_timeout_s "
              f"{self.timeout():.0f}): {named}; " + (f"stacks and heartbeats in {path}; " if path else "")
              + f"exiting with code {EXIT_HANG} so the job is requeued and resumes from the latest checkpoint",
              file=sys.stderr, flush=True)
        os._exit(EXIT_HANG)
