"""The thread governor's decisions, on step times (and load readings) simulated from a
machine whose load comes and goes; the load reading itself against real processes. The
speed under real load is measured by benchmarks/bench_train.py --under-load."""

import os
import subprocess
import sys
import time

import pytest
import torch

from saelib.threads import OtherCpuLoad, ThreadGovernor


def threads_fixture(count: int):
    """A fixture that runs its test with ``count`` PyTorch threads and puts the count back."""
    @pytest.fixture
    def fixture():
        before = torch.get_num_threads()
        torch.set_num_threads(count)
        yield
        torch.set_num_threads(before)
    return fixture


two_threads = threads_fixture(2)
eight_threads = threads_fixture(8)  # a many-core machine's count, for the simulated one


def step_time(threads: int, loaded: bool) -> float:
    # a 2-core machine: quiet, 2 threads take 1.0 and 1 thread 1.8; with one core taken,
    # 2 threads wait for the one sharing its core (4.0), 1 thread runs on the free core (1.9)
    if loaded:
        return 4.0 if threads == 2 else 1.9
    return 1.0 if threads == 2 else 1.8


def run(governor: ThreadGovernor, steps: int, loaded: bool) -> list[int]:
    used = []
    for _ in range(steps):
        used.append(governor.current)
        governor.step_done(step_time(governor.current, loaded))
    return used


def test_quiet_machine_gets_one_trial_and_keeps_its_threads(two_threads):
    governor = ThreadGovernor(load=None)
    used = []
    for noise in [1.0, 1.1, 0.95, 1.2, 1.0, 1.05, 1.3] * 40:  # ordinary jitter, below the slowdown threshold
        used.append(governor.current)
        governor.step_done(noise * step_time(governor.current, loaded=False))
    # the one trial at the start, cut short after one step on one thread (1.8x slower), then two threads throughout
    assert used.count(1) == 1
    assert governor.switches == 2 and torch.get_num_threads() == 2


def test_a_machine_busy_from_the_start_is_found_by_the_first_trial(two_threads):
    governor = ThreadGovernor(load=None)
    used = run(governor, 100, loaded=True)
    assert used[:2] == [2, 2] and used[-80:].count(1) >= 75
    # three slow steps before the trial (two of warm-up, one that starts it), three on one
    # thread, then the full-thread side is cut short after one step twice as slow
    assert used[:20] == [2, 2, 2, 1, 1, 1, 2] + [1] * 13


def test_thread_count_changes_speed_not_results():
    import itertools

    from saelib.sae import SAEConfig
    from saelib.train import TrainConfig, train_sae

    torch.manual_seed(0)
    pool = [torch.randn(2048, 128) for _ in range(3)]
    before, weights = torch.get_num_threads(), {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cfg = TrainConfig(total_tokens=2048 * 8, batch_size=2048, progress=False, adapt_threads=False,
                              dead_tokens=2048)
            result = train_sae(SAEConfig(128, 1024, "topk", k=16), lambda: itertools.islice(itertools.cycle(pool), 8), cfg)
            weights[threads] = result.sae.state_dict()
    finally:
        torch.set_num_threads(before)
    for name, tensor in weights[1].items():
        assert torch.equal(tensor, weights[2][name]), name


def test_load_moves_to_one_thread_and_back_when_it_goes(two_threads):
    governor = ThreadGovernor(recheck_every=20, load=None)
    assert run(governor, 30, loaded=False)[-20:] == [2] * 20  # after the first trial
    under_load = run(governor, 120, loaded=True)
    # it notices within a window and a trial, then runs on one thread, rechecking now and then
    assert under_load[-100:].count(1) >= 85 and torch.get_num_threads() == 1
    settled = sum(step_time(t, True) for t in under_load[-100:]) / 100
    assert settled < 0.6 * 4.0  # far better than staying on two threads under load
    after = run(governor, 120, loaded=False)
    assert after[-20:] == [2] * 20 and torch.get_num_threads() == 2
    governor.restore()
    assert torch.get_num_threads() == 2


def test_a_slowdown_that_fewer_threads_do_not_cure_keeps_the_threads(two_threads):
    # e.g. memory bandwidth taken by another process: both settings slow down alike
    governor = ThreadGovernor(recheck_every=20, load=None)
    run(governor, 30, loaded=False)
    used = []
    for _ in range(200):
        used.append(governor.current)
        governor.step_done(3.0 if governor.current == 2 else 5.4)
    # trials stay rare (at most one short trial per recheck period), the rest on two threads
    assert used.count(1) <= 3 * (200 // 20 + 1) and used[-40:].count(2) >= 36


def test_restore_puts_back_the_starting_count(two_threads):
    governor = ThreadGovernor(recheck_every=5, load=None)
    run(governor, 20, loaded=False)
    run(governor, 40, loaded=True)
    assert torch.get_num_threads() == 1
    governor.restore()
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("first, preset, expected", [
    ("import ipykernel, saelib", {}, "PASSIVE 20000"),                      # a notebook kernel, saelib before torch
    ("import saelib", {}, "None None"),                                     # a script: OpenMP's defaults
    ("import ipykernel, torch, saelib", {}, "None None"),                   # too late: torch already loaded OpenMP
    ("import ipykernel, saelib", {"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),  # the user's choice stands
    ("import ipykernel, saelib", {"GOMP_SPINCOUNT": "0"}, "None 0"),        # ... whichever of the two they set
])
def test_notebook_kernels_get_a_short_openmp_spin(first, preset, expected):
    """The OpenMP wait settings saelib gives Jupyter kernels (saelib/__init__.py), in real processes."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(preset)
    code = f"{first}; import os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == expected


class SimulatedLoad:
    """What ``OtherCpuLoad`` reads on the machine of ``step_time``: one reading every
    ``every`` calls (the real one waits for 0.3 s of ticks). Beside a busy process
    others get about half a core while the loop runs two threads (the core is shared) and a
    whole core while it runs one; ``reads`` overrides that (a reading that misdescribes)."""

    def __init__(self, every: int = 2, reads: float | None = None):
        self.loaded, self.every, self.reads, self.calls = False, every, reads, 0

    def __call__(self):
        self.calls += 1
        if self.calls % self.every:
            return None
        if self.reads is not None:
            return self.reads
        return (0.5 if torch.get_num_threads() == 2 else 1.0) if self.loaded else 0.02


def run_with(governor: ThreadGovernor, load: SimulatedLoad, steps: int, loaded: bool) -> list[int]:
    load.loaded = loaded
    return run(governor, steps, loaded)


def test_a_load_reading_finds_a_busy_machine_without_trying_full_threads(two_threads):
    load = SimulatedLoad()
    governor = ThreadGovernor(load=load)
    by_load = run_with(governor, load, 100, loaded=True)
    governor.restore()
    by_times = run(ThreadGovernor(load=None), 100, loaded=True)
    # two full-thread steps make the first reading, then one thread throughout: no warm-up, no trial
    assert by_load == [2, 2] + [1] * 98
    cost = lambda used: sum(step_time(t, True) for t in used)  # noqa: E731
    # by step times: a warm-up and trial of four full-thread steps, and a recheck on full threads after 50
    assert by_times.count(2) >= 5
    assert cost(by_load) < cost(by_times) - 2 * (4.0 - 1.9)


def test_a_load_reading_on_a_quiet_machine_changes_nothing(two_threads):
    load = SimulatedLoad()
    governor = ThreadGovernor(load=load)
    assert run_with(governor, load, 200, loaded=False) == [2] * 200 and governor.switches == 0


def test_a_load_reading_follows_load_that_comes_and_goes(two_threads):
    load = SimulatedLoad()
    governor = ThreadGovernor(load=load)
    assert run_with(governor, load, 30, loaded=False) == [2] * 30
    under_load = run_with(governor, load, 50, loaded=True)
    assert under_load[:2] == [2, 2] and under_load[2:] == [1] * 48  # within one reading
    after = run_with(governor, load, 50, loaded=False)
    assert after[:2] == [1, 1] and after[2:] == [2] * 48 and torch.get_num_threads() == 2
    assert governor.load is load  # it never had to fall back to step times


def test_light_load_keeps_full_threads(two_threads):
    load = SimulatedLoad(reads=0.25)  # below reduce_above
    governor = ThreadGovernor(load=load)
    assert run(governor, 50, loaded=False) == [2] * 50


def test_a_reading_that_misdescribes_the_machine_is_dropped_after_one_check(two_threads):
    # the reading says busy, but one thread is slower than two (the quiet machine's times):
    # a CPU quota in a container can read like this
    load = SimulatedLoad(reads=1.0)
    governor = ThreadGovernor(load=load, recheck_every=20)
    used = run(governor, 200, loaded=False)
    assert governor.load is None and used[:3] == [2, 2, 1]  # the first step on one thread is 1.8x: give up
    assert used[3:] == [2] * 197  # step times decide from then on, and a quiet machine starts no trial


def reading_beside(busy_process: bool, self_busy: bool = False, seconds: float = 1.0) -> float:
    probe = OtherCpuLoad(min_seconds=0.0)
    process = None
    if busy_process:
        core = min(os.sched_getaffinity(0))
        process = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
        time.sleep(0.5)  # let it start spinning
    try:
        probe()  # start the interval with the competitor running
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            if not self_busy:
                time.sleep(0.01)
        return probe()
    finally:
        if process is not None:
            process.kill()
            process.wait()


@pytest.mark.skipif(OtherCpuLoad.open() is None, reason="needs Linux's /proc/stat")
def test_other_cpu_load_reads_a_real_busy_process_and_not_this_one():
    quiet = reading_beside(busy_process=False)
    if quiet > len(os.sched_getaffinity(0)) - 1:  # e.g. another test run beside this one
        pytest.skip(f"other processes already take {quiet:.1f} cores: no idle core for the busy process to show on")
    beside = reading_beside(busy_process=True)
    self_busy = reading_beside(busy_process=False, self_busy=True)
    assert beside - quiet > 0.7, (quiet, beside)  # a whole core (less the ticks' rounding)
    assert self_busy - quiet < 0.3, (quiet, self_busy)  # this process's own CPU time is not load


@pytest.mark.skipif(OtherCpuLoad.open() is None, reason="needs Linux's /proc/stat")
def test_other_cpu_load_waits_for_enough_ticks_and_needs_every_cpu(tmp_path):
    probe = OtherCpuLoad(min_seconds=0.3)
    assert probe() is None  # too soon after the first sample
    time.sleep(0.35)
    assert probe() is not None
    cpu_lines = [line for line in open("/proc/stat") if line.startswith("cpu")]
    (tmp_path / "stat").write_text("".join(cpu_lines[:1]))  # only the machine-wide line: no per-CPU times
    assert OtherCpuLoad.open(stat_path=str(tmp_path / "stat")) is None
    assert OtherCpuLoad.open(stat_path=str(tmp_path / "missing")) is None
    (tmp_path / "stat").write_text("".join(cpu_lines))
    assert OtherCpuLoad.open(stat_path=str(tmp_path / "stat")) is not None


def test_training_follows_the_machine_load_with_the_same_weights(always_busy):
    import itertools

    from saelib.sae import SAEConfig
    from saelib.train import TrainConfig, train_sae

    torch.manual_seed(0)
    pool = [torch.randn(2048, 128) for _ in range(3)]
    weights = {}
    for adapt in (True, False):
        always_busy.clear()
        cfg = TrainConfig(total_tokens=2048 * 8, batch_size=2048, progress=False, adapt_threads=adapt, dead_tokens=2048)
        result = train_sae(SAEConfig(128, 1024, "topk", k=16), lambda: itertools.islice(itertools.cycle(pool), 8), cfg)
        weights[adapt] = result.sae.state_dict()
        assert always_busy[:1] == ([1] if adapt else []) and torch.get_num_threads() == 2
    for name, tensor in weights[True].items():
        assert torch.equal(tensor, weights[False][name]), name


def test_a_load_that_fits_on_spare_cpus_keeps_full_threads(two_threads):
    # four CPUs for two threads (e.g. two cores with two hardware threads each): one busy
    # process reads 1.0 and still leaves the loop's threads a CPU each
    load = SimulatedLoad(reads=1.0)
    governor = ThreadGovernor(load=load, spare_cpus=2)
    assert run(governor, 50, loaded=False) == [2] * 50
    load.reads = 2.5  # more than the spare CPUs hold
    assert run(governor, 10, loaded=True)[-5:] == [1] * 5


class SimulatedMachine:
    """A machine of ``cores`` cores beside ``busy`` processes that each spin on a core, for
    a loop whose step is 8 units of work split over its threads. A step takes 8 / threads
    while every thread has a core of its own, and four times that once a thread shares its
    core with a busy process (the op waits for that thread while the others spin: issue
    20's Xeon measured 4x on two cores). Called, it is the load reading ``OtherCpuLoad``
    would give, once every ``every`` calls: the busy processes' cores, less half of each
    core they share with a thread of the loop."""

    def __init__(self, cores: int, every: int = 2):
        self.cores, self.every, self.busy, self.calls = cores, every, 0, 0

    def shared(self, threads: int) -> int:
        return max(0, min(self.busy, threads + self.busy - self.cores))

    def step_time(self, threads: int) -> float:
        return 8.0 / threads * (4.0 if self.shared(threads) else 1.0)

    def __call__(self):
        self.calls += 1
        if self.calls % self.every:
            return None
        return self.busy - 0.5 * self.shared(torch.get_num_threads())

    def run(self, governor: ThreadGovernor, steps: int, busy: int) -> list[int]:
        self.busy, used = busy, []
        for _ in range(steps):
            used.append(governor.current)
            governor.step_done(self.step_time(governor.current))
        return used


def test_many_cores_give_up_one_thread_per_busy_process(eight_threads):
    machine = SimulatedMachine(cores=8)
    governor = ThreadGovernor(load=machine)
    assert machine.run(governor, 20, busy=0) == [8] * 20
    one = machine.run(governor, 20, busy=1)
    assert one == [8, 8] + [7] * 18  # within one reading
    # halving (the one lower setting before, and still the one step times know) would have
    # run the same 20 steps as [8, 8] + [4] * 18: 44 units of time against 28.6
    halving = [8, 8] + [4] * 18
    assert sum(map(machine.step_time, one)) < 0.7 * sum(map(machine.step_time, halving))
    two = machine.run(governor, 20, busy=2)
    assert two[:2] == [7, 7] and two[-10:] == [6] * 10
    assert machine.run(governor, 20, busy=1)[-10:] == [7] * 10  # one leaves: its thread comes back
    assert machine.run(governor, 20, busy=0)[-10:] == [8] * 10
    assert governor.load is machine  # no move down was slower, so the readings were kept throughout
    governor.restore()
    assert torch.get_num_threads() == 8


def test_several_busy_processes_at_once_settle_within_two_readings(eight_threads):
    machine = SimulatedMachine(cores=8)
    governor = ThreadGovernor(load=machine)
    # beside eight threads three busy processes read 1.5 cores (they share three cores);
    # two threads go at once, and beside six the one core still shared costs one more
    used = machine.run(governor, 20, busy=3)
    assert used[:6] == [8, 8, 6, 6, 5, 5] and used[6:] == [5] * 14
    assert governor.switches == 2 and governor.load is machine


def test_many_cores_a_reading_that_misdescribes_is_dropped(eight_threads):
    # the reading says three cores are taken, but the machine is quiet: five threads are
    # slower than eight, so the first step there ends the readings' say
    machine = SimulatedMachine(cores=8)
    governor = ThreadGovernor(load=lambda: 3.0)
    used = machine.run(governor, 30, busy=0)
    assert used[:3] == [8, 5, 8] and used[3:] == [8] * 27 and governor.load is None


class LoadWithStartGuess(SimulatedLoad):
    """``SimulatedLoad`` that also counts other processes' runnable threads at the moment
    (``OtherCpuLoad.runnable_now``): one beside the busy process, ``transient`` more on a
    quiet machine (a task that happens to run just then)."""

    def __init__(self, transient: int = 0):
        super().__init__()
        self.transient = transient

    def runnable_now(self) -> int:
        return 1 if self.loaded else self.transient


def loop_with(governor: ThreadGovernor, load: SimulatedLoad, steps: int, loaded: bool) -> list[int]:
    """``run_with`` inside ``with governor:``, as ``follow_load`` runs it."""
    load.loaded = loaded
    with governor:
        return run(governor, steps, loaded)


def test_a_machine_busy_at_the_start_starts_on_fewer_threads(two_threads):
    load = LoadWithStartGuess()
    guessed = loop_with(ThreadGovernor(load=load), load, 20, loaded=True)
    assert guessed == [1] * 20 and torch.get_num_threads() == 2  # put back at the end
    load = SimulatedLoad()  # the same without the guess: two steps on two threads, at 4.0 each
    read_only = loop_with(ThreadGovernor(load=load), load, 20, loaded=True)
    assert read_only == [2, 2] + [1] * 18
    cost = lambda used: sum(step_time(t, True) for t in used)  # noqa: E731
    assert cost(guessed) < cost(read_only) - 2 * (4.0 - 1.9) + 1e-9


def test_a_quiet_start_keeps_full_threads_and_a_wrong_guess_lasts_one_reading(two_threads):
    load = LoadWithStartGuess()
    governor = ThreadGovernor(load=load)
    assert loop_with(governor, load, 20, loaded=False) == [2] * 20 and governor.switches == 0
    load = LoadWithStartGuess(transient=1)  # something ran just as the loop started
    assert loop_with(ThreadGovernor(load=load), load, 20, loaded=False) == [1, 1] + [2] * 18


def test_the_start_guess_counts_only_busy_processes_beyond_spare_cpus(eight_threads):
    load = LoadWithStartGuess()
    load.runnable_now = lambda: 3
    with ThreadGovernor(load=load) as governor:
        assert governor.current == 5
    with ThreadGovernor(load=load, spare_cpus=2) as governor:
        assert governor.current == 7
    assert torch.get_num_threads() == 8


def runnable_beside(busy_process: bool, busy_thread: bool = False) -> int:
    """``OtherCpuLoad.runnable_now`` with a busy process pinned to one of this process's
    CPUs, or a thread of this process busy with PyTorch products (the GIL released)."""
    import threading

    probe, process, stop = OtherCpuLoad(), None, threading.Event()
    if busy_process:
        core = min(os.sched_getaffinity(0))
        process = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
        time.sleep(0.5)
    worker = None
    if busy_thread:
        def products():
            a = torch.randn(256, 256)
            while not stop.is_set():
                a @ a
        worker = threading.Thread(target=products)
        worker.start()
        time.sleep(0.2)
    try:
        return probe.runnable_now(samples=5)
    finally:
        stop.set()
        if worker is not None:
            worker.join()
        if process is not None:
            process.kill()
            process.wait()


@pytest.mark.skipif(OtherCpuLoad.open() is None or OtherCpuLoad().runnable_now() is None,
                    reason="needs Linux's /proc/stat and every CPU in this process's affinity")
def test_runnable_now_counts_a_busy_process_and_not_this_ones_threads():
    quiet = runnable_beside(busy_process=False)
    assert runnable_beside(busy_process=True) - quiet >= 1
    assert runnable_beside(busy_process=False, busy_thread=True) - quiet < 1
