"""Intra-op threads that follow the machine's load while a loop runs.

PyTorch on a CPU splits each op over ``torch.get_num_threads()`` OpenMP threads and waits
for the slowest. When another process takes one of two cores, the thread that shares its
core runs at half speed, the other waits for it at every op, and a loop of many small ops
can fall below half its quiet speed (to 26% on an Intel Xeon, 47% on an AMD EPYC),
while one thread alone on the free core keeps half or more.
No fixed setting is right on a laptop whose load comes and goes, so ``ThreadGovernor``
follows it while the loop runs.

Where the kernel says how busy each CPU is (Linux's /proc/stat), it reads the CPU time
that *other* processes took on this process's CPUs (``OtherCpuLoad``) every 0.3 s or so:
for each core they take, it gives up one thread (7 of 8 beside one busy process); when
they leave, it takes the threads back. No step is spent trying a setting, which matters
because one step on full threads beside a busy process took 5x as long as a step on one
thread (issue 20's Xeon); for the same reason a loop starts on fewer threads when other
processes' threads are runnable at that moment (``OtherCpuLoad.runnable_now``), before
the first reading. After each move to fewer threads it checks the step times once: if
fewer threads turn out slower (a reading that does not describe this machine, e.g. a CPU
quota in a container), it goes back to full threads and from then on decides by step
times alone, as it does where there is no /proc/stat.

By step times: when steps slow down beyond what the quiet machine gave, it tries fewer
threads for a few steps and keeps whichever was faster; every ``recheck_every`` steps on
fewer threads (less often while the load stays) it tries the full count again, so the
speed comes back when the load goes. A machine already busy when the loop starts has no
quiet speed to compare with, so the first steps after a short warm-up are one trial of
both settings; on a quiet machine that trial is all that happens (one step on fewer
threads).

The thread count changes the speed, and at most the last bits of a result; TopK training
gives the same weights bit for bit on one and on two threads (tests/test_threads.py). Loops
use it through ``follow_load``: training, harvesting, the downstream losses and hook means
of ``saelib.metrics``, ``FeatureActivations.collect``, the forward passes of
``saelib.controls`` and the IOI measurements of ``saelib.ioi``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import torch


class OtherCpuLoad:
    """Call it for the CPU time, in cores, that everything but this process took on the
    CPUs this process may run on since the previous reading: about 1.0 beside one busy
    process, about 0 on a quiet machine, whatever this process itself does. None while
    less than ``min_seconds`` have passed: /proc/stat counts in ticks of 10 ms, so
    shorter readings are too coarse. Hypervisor steal time counts as taken (a vCPU the
    host gave to someone else stalls a thread like a busy process does).

    It subtracts this process's own CPU time (``time.process_time``: every thread of it)
    from the busy time of its CPUs. ``open()`` gives None where that cannot be read."""

    def __init__(self, min_seconds: float = 0.3, stat_path: str = "/proc/stat"):
        self.cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        self.stat_path, self.min_seconds = stat_path, min_seconds
        self.tick_seconds = 1 / os.sysconf("SC_CLK_TCK")
        self.last = self._sample()

    @classmethod
    def open(cls, **kwargs) -> "OtherCpuLoad | None":
        """An ``OtherCpuLoad``, or None where the system has no per-CPU busy times to read."""
        try:
            return cls(**kwargs)
        except (OSError, ValueError, AttributeError):  # no /proc/stat, no sched_getaffinity (not Linux)
            return None

    def _busy_seconds(self) -> float:
        busy_ticks, seen = 0, 0
        with open(self.stat_path) as stat:
            for line in stat:
                if not line.startswith("cpu"):
                    break  # the per-CPU lines come first
                fields = line.split()
                if fields[0] in self.cpus:
                    # user nice system idle iowait irq softirq steal (guest time is part of user)
                    user, nice, system, _, _, irq, softirq, steal = (int(v) for v in fields[1:9])
                    busy_ticks += user + nice + system + irq + softirq + steal
                    seen += 1
        if seen != len(self.cpus):
            raise ValueError(f"{self.stat_path}: found {seen} of this process's {len(self.cpus)} CPUs")
        return busy_ticks * self.tick_seconds

    def runnable_now(self, samples: int = 3) -> int | None:
        """How many threads of other processes are running or waiting to run right now, the
        fewest of ``samples`` looks 1 ms apart (a short-lived task seldom shows in all of
        them): the kernel's count of runnable threads (``procs_running`` in /proc/stat) less
        this process's own. None where this process may not use every CPU (the count is the
        whole machine's) or it cannot be read. A start-up guess for the thread count:
        unlike a reading of CPU time it needs no interval to pass."""
        if len(self.cpus) != os.cpu_count():
            return None
        fewest = None
        try:
            for sample in range(samples):
                if sample:
                    time.sleep(0.001)
                with open(self.stat_path) as stat:
                    running = next(int(line.split()[1]) for line in stat if line.startswith("procs_running"))
                now = max(0, running - _own_running_threads())
                fewest = now if fewest is None else min(fewest, now)
                if fewest == 0:
                    break  # on a quiet machine one look is enough
        except (OSError, ValueError, StopIteration):
            return None
        return fewest

    def _sample(self) -> tuple[float, float, float]:
        return time.perf_counter(), self._busy_seconds(), time.process_time()

    def __call__(self) -> float | None:
        if time.perf_counter() - self.last[0] < self.min_seconds:
            return None
        (wall0, busy0, own0), now = self.last, self._sample()
        self.last = now
        wall1, busy1, own1 = now
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (wall1 - wall0))


def _own_running_threads() -> int:
    """This process's threads that are running or runnable (state R): this one, and
    OpenMP's workers while they spin after an op."""
    running = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as stat:
                running += stat.read().rpartition(")")[2].split()[0] == "R"
        except OSError:  # the thread ended meanwhile
            pass
    return running


class ThreadGovernor:
    """Call ``step_done(seconds)`` after each step of a loop; it sets ``torch.set_num_threads``.

    ``slowdown``: a step this many times slower than the quiet baseline (the fastest median
    of ``window`` steps seen at full thread count) starts a trial of fewer threads.
    ``trial_steps`` steps measure each setting (their median decides); a first step on either
    setting ``give_up`` times slower than the latest step on the other ends that setting's
    measurement at once (the up-front trial then costs one slow step, not ``trial_steps``:
    on fewer threads on a quiet machine, on full threads on a busy one). ``restore()`` puts
    back the thread count found at construction.

    ``load``: a function giving the cores other processes took since its last call, or None
    when it has no reading yet (``OtherCpuLoad``, the default where /proc/stat can be read);
    None: decide by step times alone. With a reading, the governor gives up one thread for
    each core others take beyond the threads it already gave up, once they take more than
    ``reduce_above`` of a core beyond that, and takes one back for each given-up core they
    leave idle by more than ``1 - restore_below`` (``threads_for``): on 8 cores beside one
    busy process it runs 7 threads, beside two 6. ``restore_below`` is below
    ``reduce_above`` because on a shared core others get less than they ask for, so the
    same load reads lower on more threads, and the two thresholds cannot take turns on one
    load. Both are counted beyond ``spare_cpus``, the CPUs this process may use beyond its
    full thread count (default: from its CPU affinity, e.g. the second hardware thread of
    each core where PyTorch runs one thread per core): a load that fits there takes no
    core from the loop. Step times alone know only full threads and half."""

    def __init__(self, window: int = 5, trial_steps: int = 3, slowdown: float = 1.4, recheck_every: int = 50,
                 warmup_steps: int = 2, give_up: float = 1.5,
                 load: Callable[[], float | None] | None | str = "proc", reduce_above: float = 0.3,
                 restore_below: float = 0.2, spare_cpus: int | None = None):
        self.full = torch.get_num_threads()
        self.reduced = max(1, self.full // 2)  # the one lower setting that step times try
        self.load = (OtherCpuLoad.open() if load == "proc" else load) if self.full > 1 else None
        if spare_cpus is None:
            spare_cpus = len(self.load.cpus) - self.full if isinstance(self.load, OtherCpuLoad) else 0
        self.spare_cpus = max(0, spare_cpus)
        self.reduce_above, self.restore_below = reduce_above, restore_below
        self.window_steps: list[float] = []  # step times at the current count since the latest load reading
        self.check: list[float] | None = None  # step times since the load moved us to fewer threads
        self.check_against = 0.0  # the slowest step before that move, of the reading that made it
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
        self.lap_started = time.perf_counter()  # for lap()
        self.switches = 0
        """How many times the thread count changed. On a quiet machine: 0 where the load is
        read, 2 where step times decide (the up-front trial)."""

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
        if not self.active:
            return
        if self.load is not None:
            self._follow_load(seconds)
            return
        if self.seen <= self.warmup_steps:
            return
        if self.seen == self.warmup_steps + 1 and self.trial is None and self.first_trial:
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

    def threads_for(self, others: float) -> int:
        """The thread count to run next, given that other processes took ``others`` cores
        (a load reading) while this loop ran ``current`` threads.

        Cores that others take beyond the spare CPUs and beyond the threads already given up
        (``excess``) cost one thread each, less ``reduce_above``: one busy process beside 8
        threads on 8 cores reads about half a core (its core is shared) and moves to 7
        threads, not to 4. Given-up cores that others leave idle (``room``) come back one
        thread each once they are idle by more than ``1 - restore_below`` cores. On two
        cores this is the rule of old: one thread above a reading of 0.3 on two, two below
        0.2 on one."""
        taken = max(0.0, others - self.spare_cpus)
        given_up = self.full - self.current
        excess = taken - given_up
        if excess > self.reduce_above:
            return max(1, self.current - math.ceil(excess - self.reduce_above))
        room = given_up - taken
        return min(self.full, self.current + max(0, math.ceil(room + self.restore_below - 1)))

    def _follow_load(self, seconds: float) -> None:
        """``step_done`` where other processes' CPU time can be read."""
        if self.check is None:
            self.window_steps.append(seconds)
        else:
            self.check.append(seconds)
            slower = (seconds > self.give_up * self.check_against if len(self.check) == 1
                      else len(self.check) >= self.trial_steps and statistics.median(self.check) > self.check_against)
            if slower:
                # fewer threads lost under the load the reading reported, so the reading does not
                # describe this machine: back to full threads, and step times decide from now on
                self.load, self.check = None, None
                self.first_trial = False  # no up-front trial: the check just made stands for it
                self._set(self.full)
                return
            if len(self.check) >= self.trial_steps:
                self.check = None
        others = self.load()
        if others is None:
            return
        threads = self.threads_for(others)
        if threads < self.current:
            if self.check is None:  # a move down while checking the last one keeps that check's baseline
                self.check_against = max(self.window_steps, default=seconds)
            self.check = []
            self._set(threads)
        elif threads > self.current:
            self.check = None
            self._set(threads)
        self.window_steps = []

    def restore(self) -> None:
        """Put back the thread count the loop started with."""
        if self.active:
            torch.set_num_threads(self.full)
            self.current = self.full

    def lap(self) -> None:
        """``step_done`` with the time since the previous ``lap`` (or since the ``with`` began)."""
        now = time.perf_counter()
        self.step_done(now - self.lap_started)
        self.lap_started = now

    def start_guess(self) -> None:
        """Start on fewer threads when other processes' threads are runnable at this moment
        (``OtherCpuLoad.runnable_now``), one thread fewer for each beyond the spare CPUs:
        the first load reading comes only after 0.3 s, and beside a busy process the steps
        before it ran at a third of one thread's speed (a first step of 340-470 ms against
        110-130 ms on one thread, issue 20's Xeon). A wrong guess (a task that ran only
        then) costs those steps on fewer threads, until the first reading takes them back."""
        runnable = getattr(self.load, "runnable_now", None)
        others = runnable() if self.active and callable(runnable) else None
        if others is not None:
            self._set(max(1, min(self.current, self.full - max(0, others - self.spare_cpus))))

    def __enter__(self) -> "ThreadGovernor":
        self.start_guess()
        self.lap_started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


class _Unchanged:
    """``follow_load``'s stand-in where the thread count stays as it is."""

    def lap(self) -> None:
        pass

    def __enter__(self) -> "_Unchanged":
        return self

    def __exit__(self, *exc) -> None:
        pass


def follow_load(enabled: bool = True, device: str | torch.device = "cpu") -> ThreadGovernor | _Unchanged:
    """``with follow_load() as load:`` around a loop of CPU work that calls ``load.lap()``
    after each step: the thread count follows the machine's load (``ThreadGovernor``) and is
    put back when the block ends, by an exception too. Off a CPU, or with ``enabled``
    False, it changes nothing.

    The thread count can change the last bits of a result: MKL may split a small product
    differently on one and on two threads (the embedded model's forward pass over 2 x 32
    tokens differs by 2e-5 at ``blocks.0.hook_mlp_out``; over 16 x 32 tokens or more it is
    identical). Bit for bit the same on any count, by test: TopK training
    (tests/test_threads.py), harvesting the embedded model (tests/test_harvest.py), the
    downstream losses and feature records of the tests' small model."""
    if not enabled or torch.device(device).type != "cpu":
        return _Unchanged()
    return ThreadGovernor()
