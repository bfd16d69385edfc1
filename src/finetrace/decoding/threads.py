"""How many torch threads a decode step uses: chosen by timing steps, because a shared CPU decides it.

A decode step is a few hundred small kernels (OpenMP fork-join each) plus GEMMs bound by memory
bandwidth. On an idle machine every core helps the GEMMs; on an oversubscribed one (other processes on
the cores), each fork-join waits for a thread the OS has descheduled, and measured here (2 cores, load
average 4-6) a SmolLM2 decode step ran 4-6x slower on 2 threads than on 1. Neither choice is right
everywhere, so the decoder measures: every ``period`` decode steps it runs ``trial`` steps on each
candidate (interleaved, so they see the same batch and the same load), keeps the one with the lowest
median step time, and doubles ``period`` (up to ``max_period``) while the winner stays the same.

Thread counts do not change what a row computes beyond fp32 summation order (as batching does).

A scheduler thread (the serving engine's) that decodes while another thread's OpenMP team still exists
(the main thread's, from loading the model) decodes slower: libgomp counts every team's workers, and once
they outnumber the CPUs it spins only ~100 iterations before sleeping, so each of a step's several hundred
fork-joins waits for a futex wake. Measured on 2 cores, SmolLM2, the native step on a worker thread: 49 ms
for a batch of 16 and 23 ms for one row, against 31 and 13 ms once the main thread's team was released
(``release_openmp_team``, OpenMP 5's ``omp_pause_resource_all``), the same as on the main thread.
"""

from __future__ import annotations

import ctypes
import functools
import statistics

import torch


@functools.cache
def _gomp():
    try:
        lib = ctypes.CDLL("libgomp.so.1")  # the copy torch loaded (one per process, by its soname)
        lib.omp_pause_resource_all.argtypes, lib.omp_pause_resource_all.restype = [ctypes.c_int], ctypes.c_int
        return lib
    except (OSError, AttributeError):
        return None


def release_openmp_team() -> bool:
    """Let the calling thread's idle OpenMP worker threads exit (``omp_pause_resource_all(omp_pause_soft)``;
    its next parallel region starts a new team). Call it from the thread that hands decoding to another.
    False where torch's OpenMP runtime is not libgomp 9+ (nothing done)."""
    lib = _gomp()
    return lib is not None and lib.omp_pause_resource_all(1) == 0  # 1: omp_pause_soft


class ThreadTuner:
    """Picks the thread count for the next decode step (``threads``) from measured steps (``record``)."""

    def __init__(self, choices: list[int] | None = None, period: int = 64, trial: int = 3, max_period: int = 1024):
        n = torch.get_num_threads()
        self.choices = sorted(set(choices or {max(1, n // 2), n}))
        self.best = max(self.choices)
        self.period, self.trial, self.max_period = period, trial, max_period
        self.n = 0  # decode steps since the last trial began
        self.times: dict[int, list[float]] = {c: [] for c in self.choices}

    def _trial_len(self) -> int:
        return self.trial * len(self.choices) if len(self.choices) > 1 else 0

    def threads(self) -> int:
        k = self.n
        if k < self._trial_len():
            return self.choices[k % len(self.choices)]
        return self.best

    def record(self, threads: int, seconds: float) -> None:
        """One decode step on ``threads`` threads took ``seconds``."""
        k, trial = self.n, self._trial_len()
        self.n += 1
        if k < trial:
            self.times[threads].append(seconds)
            if k == trial - 1:
                best = min(self.choices, key=lambda c: statistics.median(self.times[c]))
                if best == self.best:
                    self.period = min(2 * self.period, self.max_period)
                self.best = best
                self.times = {c: [] for c in self.choices}
        elif self.n >= self.period:
            self.n = 0  # the next trial
