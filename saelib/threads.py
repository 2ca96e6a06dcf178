"""Intra-op threads that follow the machine's load while a loop runs.

PyTorch on a CPU splits each op over ``torch.get_num_threads()`` OpenMP threads and waits
for the slowest. When another process takes one of two cores, the thread that shares its
core runs at half speed, the other waits for it at every op, and a loop of many small ops
can fall below half its quiet speed (to 26% on an Intel Xeon, 47% on an AMD EPYC),
while one thread alone on the free core keeps half or more.
No fixed setting is right on a laptop whose load comes and goes, so ``ThreadGovernor``
decides from the loop's own step times: it watches them, and when steps slow down beyond
what the quiet machine gave, it tries fewer threads for a few steps and keeps whichever
was faster; every ``recheck_every`` steps on fewer threads (less often while the load
stays) it tries the full count again, so the speed comes back when the load goes.

A machine already busy when the loop starts has no quiet speed to compare with, so the
first steps after a short warm-up are one trial of both settings. On a quiet machine that
trial is all that happens (one step on fewer threads); the thread count never changes
the numbers, only the speed (tests/test_threads.py checks that training gives the same
weights bit for bit on one and on two threads).
"""

from __future__ import annotations

import statistics

import torch


class ThreadGovernor:
    """Call ``step_done(seconds)`` after each step of a loop; it sets ``torch.set_num_threads``.

    ``slowdown``: a step this many times slower than the quiet baseline (the fastest median
    of ``window`` steps seen at full thread count) starts a trial of fewer threads.
    ``trial_steps`` steps measure each setting (their median decides); a first step on either
    setting ``give_up`` times slower than the latest step on the other ends that setting's
    measurement at once (the up-front trial then costs one slow step, not ``trial_steps``:
    on fewer threads on a quiet machine, on full threads on a busy one). ``restore()`` puts
    back the thread count found at construction."""

    def __init__(self, window: int = 5, trial_steps: int = 3, slowdown: float = 1.4, recheck_every: int = 50,
                 warmup_steps: int = 2, give_up: float = 1.5):
        self.full = torch.get_num_threads()
        self.reduced = max(1, self.full // 2)
        self.window, self.trial_steps, self.slowdown = window, trial_steps, slowdown
        self.recheck_every, self.warmup_steps, self.give_up = recheck_every, warmup_steps, give_up
        self.last_full: float | None = None  # the latest step time seen on full threads
        self.last_reduced: float | None = None  # ... and on fewer threads
        self.current = self.full
        self.baseline: float | None = None  # quiet median step time at full threads
        self.recent: list[float] = []
        self.trial: dict[int, list[float]] | None = None  # threads -> step times, while a trial runs
        self.trial_order: list[int] = []
        self.steps_on_reduced = 0
        self.recheck_interval = recheck_every  # doubles while trials keep confirming the setting in use
        self.current_before_trial = self.full
        self.first_trial = True
        self.cooldown = 0  # steps before a slowdown at full threads may start another trial
        self.seen = 0
        self.switches = 0
        """How many times the thread count changed (2 on a quiet machine: the first trial)."""

    @property
    def active(self) -> bool:
        return self.full > 1

    def _set(self, threads: int) -> None:
        if threads != self.current:
            torch.set_num_threads(threads)
            self.current = threads
            self.switches += 1

    def _start_trial(self, order: list[int]) -> None:
        self.trial, self.trial_order = {t: [] for t in order}, order
        self.current_before_trial = self.current
        self._set(order[0])

    def step_done(self, seconds: float) -> None:
        """Record one step's wall time and adjust the thread count for the next."""
        self.seen += 1
        other = self.last_reduced if self.current == self.full else self.last_full  # before this step
        if self.current == self.full:
            self.last_full = seconds
        else:
            self.last_reduced = seconds
        if not self.active or self.seen <= self.warmup_steps:
            return
        if self.seen == self.warmup_steps + 1 and self.trial is None:
            # a machine already busy when the loop starts has no quiet baseline to fall
            # behind: one trial of both settings up front tells which is faster now
            self._start_trial([self.reduced, self.full])
            return
        if self.trial is not None:
            self.trial[self.current].append(seconds)
            if len(self.trial[self.current]) == 1 and other is not None and seconds > self.give_up * other:
                # far slower than the other setting just was (fewer threads on a quiet machine,
                # full threads on a busy one, where a step took 4x as long): one such step is enough
                self.trial[self.current] *= self.trial_steps
            if len(self.trial[self.current]) < self.trial_steps:
                return
            pending = [t for t in self.trial_order if len(self.trial[t]) < self.trial_steps]
            if pending:
                self._set(pending[0])
                return
            medians = {t: statistics.median(times) for t, times in self.trial.items()}
            best = min(medians, key=medians.get)
            # each trial costs slow steps: while trials keep confirming the setting in use, space
            # them out (up to four times), and start afresh when one changes it
            confirmed = best == self.current_before_trial and not self.first_trial
            self.recheck_interval = (min(2 * self.recheck_interval, 4 * self.recheck_every) if confirmed
                                     else self.recheck_every)
            self.first_trial = False
            if best == self.full:
                self.baseline = min(self.baseline, medians[best]) if self.baseline else medians[best]
            self.trial = None
            self.recent = []
            self.steps_on_reduced = 0
            self.cooldown = self.recheck_interval if confirmed else 0
            self._set(best)
            return
        self.recent = (self.recent + [seconds])[-self.window:]
        if self.current == self.full:
            self.cooldown = max(0, self.cooldown - 1)
            if len(self.recent) < self.window:
                return
            median = statistics.median(self.recent)
            if self.baseline is None or median < self.baseline:
                self.baseline = median
            elif median > self.slowdown * self.baseline and self.cooldown == 0:
                self._start_trial([self.reduced, self.full])
        else:
            self.steps_on_reduced += 1
            if self.steps_on_reduced >= self.recheck_interval:
                self._start_trial([self.full, self.reduced])

    def restore(self) -> None:
        """Put back the thread count the loop started with."""
        if self.active:
            torch.set_num_threads(self.full)
            self.current = self.full
