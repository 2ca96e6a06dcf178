"""The thread governor's decisions, on step times simulated from a machine whose load comes
and goes (its speed under real load is measured by benchmarks/bench_train.py --under-load)."""

import pytest
import torch

from saelib.threads import ThreadGovernor


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


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
    governor = ThreadGovernor()
    used = []
    for noise in [1.0, 1.1, 0.95, 1.2, 1.0, 1.05, 1.3] * 40:  # ordinary jitter, below the slowdown threshold
        used.append(governor.current)
        governor.step_done(noise * step_time(governor.current, loaded=False))
    # the one trial at the start, cut short after one step on one thread (1.8x slower), then two threads throughout
    assert used.count(1) == 1
    assert governor.switches == 2 and torch.get_num_threads() == 2


def test_a_machine_busy_from_the_start_is_found_by_the_first_trial(two_threads):
    governor = ThreadGovernor()
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
    governor = ThreadGovernor(recheck_every=20)
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
    governor = ThreadGovernor(recheck_every=20)
    run(governor, 30, loaded=False)
    used = []
    for _ in range(200):
        used.append(governor.current)
        governor.step_done(3.0 if governor.current == 2 else 5.4)
    # trials stay rare (at most one short trial per recheck period), the rest on two threads
    assert used.count(1) <= 3 * (200 // 20 + 1) and used[-40:].count(2) >= 36


def test_restore_puts_back_the_starting_count(two_threads):
    governor = ThreadGovernor(recheck_every=5)
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
