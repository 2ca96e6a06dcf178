"""Scale-out (issue 21): the trainer under torchrun with 2 gloo ranks on CPU takes the steps
one process takes on the same global batch, resumes after one rank is killed, and refuses
bad set-ups with one line on every rank instead of hanging. Every run here is a real
``torchrun`` (or, for ranks started apart, real processes meeting at a TCP port)."""

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from test_training_guards import D_IN, write_store

BASE = ["--batch-size", 64, "--log-every", 4, "--lr", 0.004, "--lr-warmup-steps", 5, "--no-progress"]
ARCHITECTURES = {
    # few rows per latent and a short dead window: AuxK runs on most steps
    "topk": ["--d-sae", 96, "--k", 3, "--dead-tokens", 192, "--tokens", 64 * 40],
    "batchtopk": ["--architecture", "batchtopk", "--d-sae", 64, "--k", 4, "--tokens", 64 * 40],
    "relu": ["--architecture", "relu", "--d-sae", 64, "--l1-coefficient", 0.3, "--tokens", 64 * 40],
}


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]), **extra}


def torchrun(*args, nproc=2, timeout=240, **popen):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "-m", "saelib", "train", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env(), **popen)


def one_process(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "saelib", "train", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Planted sparse data: 48 directions, each row a few of them."""
    generator = torch.Generator().manual_seed(0)
    atoms = torch.randn(48, D_IN, generator=generator)
    codes = (torch.rand(2048, 48, generator=generator) < 0.06) * torch.rand(2048, 48, generator=generator) * 3
    acts = codes @ atoms + 0.05 * torch.randn(2048, D_IN, generator=generator)
    return write_store(tmp_path_factory.mktemp("ddp") / "store", acts)


def assert_same_run(out_a: Path, out_b: Path, atol=1e-5):
    weights_a, weights_b = load_file(out_a / "sae_weights.safetensors"), load_file(out_b / "sae_weights.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        difference = (weights_a[name] - weights_b[name]).abs().max().item()
        assert difference <= atol, f"{name} differs by {difference}"
    rows_a = pd.read_json(out_a / "checkpoint" / "metrics.jsonl", lines=True)
    rows_b = pd.read_json(out_b / "checkpoint" / "metrics.jsonl", lines=True)
    assert list(rows_a.step) == list(rows_b.step)
    pd.testing.assert_frame_equal(rows_a, rows_b, rtol=1e-5, atol=1e-6)
    return rows_a


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_two_ranks_take_the_steps_of_one_process(store, tmp_path, architecture):
    args = [*BASE, *ARCHITECTURES[architecture]]
    alone = one_process(store.folder, tmp_path / "one", *args)
    assert alone.returncode == 0, alone.stderr
    shared = torchrun(store.folder, tmp_path / "two", *args)
    assert shared.returncode == 0, shared.stderr
    assert "over 2 ranks" in shared.stdout and shared.stdout.count("trained step") == 1  # rank 0 reports
    rows = assert_same_run(tmp_path / "one", tmp_path / "two")
    assert rows.fvu.iloc[-1] < 0.9 * rows.fvu.iloc[0]  # it trained: a run that did nothing would also agree
    if architecture == "topk":
        assert (rows.aux_loss > 0).sum() >= len(rows) // 2  # the AuxK path (global error variance) ran
    if architecture == "batchtopk":  # the batch-wide cut-off varies per row: L0 is a mean, not exactly k
        assert load_file(tmp_path / "two" / "sae_weights.safetensors")["threshold"][0] > 0


def test_each_rank_reads_only_its_own_rows_of_each_global_batch(store):
    """The ranks split the reading, not only the training: at every step rank r reads just
    rows B/N*r ... B/N*(r+1) of the global batch one process reads, and they hold its values."""
    from saelib.distributed import Group
    from saelib.store import ActivationStore
    from saelib.train import TrainConfig, _batches

    cfg = TrainConfig(batch_size=64, total_tokens=64 * 40)
    reads = {}

    def spied(rank: int) -> ActivationStore:
        reader = ActivationStore(store.folder)
        gather = reader.gather
        reads[rank] = []
        reader.gather = lambda rows: (reads[rank].append(np.asarray(rows).copy()), gather(rows))[1]
        return reader

    alone = [b for (b,) in itertools.islice(_batches([spied(-1)], cfg, Group.single()), 40)]
    ranks = [[b for (b,) in itertools.islice(_batches([spied(r)], cfg, Group(r, 2)), 40)] for r in (0, 1)]
    for step in range(40):
        assert torch.equal(torch.cat([ranks[0][step].local_BD, ranks[1][step].local_BD]), alone[step].local_BD)
        first, second, whole = reads[0][step], reads[1][step], reads[-1][step]
        assert len(first) == len(second) == 32 and np.array_equal(np.concatenate([first, second]), whole)
    assert sum(map(len, reads[0])) == sum(map(len, reads[-1])) // 2  # half the rows each, nothing read twice
    assert torch.equal(ranks[1][0].whole(), alone[0].local_BD)  # the whole first batch, for set-up, on demand


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the workers torchrun started (read from their environment)."""
    found = {}
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(child)
    return found


def test_a_killed_rank_resumes_to_the_same_weights(store, tmp_path):
    args = [*BASE, *ARCHITECTURES["topk"], "--tokens", 64 * 300, "--checkpoint-minutes", 0.0005]
    reference = one_process(store.folder, tmp_path / "reference", *args)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "two"
    log = out / "checkpoint" / "metrics.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "saelib", "train", *map(str, [store.folder, out, *args])]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 15):
        time.sleep(0.05)
    os.kill(rank_pids(launcher)[1], signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode != 0, stderr
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert 0 < state["step"] < 300, state["step"]  # killed mid-run, with a checkpoint to resume from
    assert not (out / "sae_weights.safetensors").exists()
    resumed = torchrun(store.folder, out, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "trained step 300 of 300" in resumed.stdout
    assert_same_run(tmp_path / "reference", out)


def one_line_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_batch_that_does_not_split_over_the_ranks_stops_every_rank(store, tmp_path):
    run = torchrun(store.folder, tmp_path / "out", "--d-sae", 32, "--k", 4, "--batch-size", 63, "--tokens", 630,
                   timeout=120)
    assert run.returncode != 0
    # both ranks say it (their lines may interleave on the shared stderr)
    assert run.stderr.count("error: batch_size 63 does not split evenly over 2 ranks") == 2, run.stderr
    # (torchrun then prints its own report of the failed workers, with its traceback)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_rank(rank: int, world: int, port: int, args, timeout_s: float = 60) -> subprocess.Popen:
    """A rank started by hand, as each node of a multi-node job starts its own command."""
    return subprocess.Popen([sys.executable, "-m", "saelib", "train", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                    MASTER_PORT=str(port), SAELIB_DIST_TIMEOUT=str(timeout_s)))


def test_a_damaged_shard_in_one_ranks_share_stops_every_rank(store, tmp_path):
    """Each rank checks the sha256 of its share of the shards; what rank 1 finds, rank 0 says too."""
    damaged = tmp_path / "store"
    shutil.copytree(store.folder, damaged)
    last = sorted(damaged.glob("shard_*.npy"))[-1]  # in rank 1's share
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum can tell
    last.write_bytes(bytes(data))
    port, started = free_port(), time.time()
    ranks = [start_rank(r, 2, port, [damaged, tmp_path / "out", *BASE, *ARCHITECTURES["topk"]]) for r in (0, 1)]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert time.time() - started < 50  # neither waited out the 60 s collective timeout
    for rank, (_, stderr) in zip(ranks, outputs):
        assert rank.returncode == 2, stderr
        assert [line for line in one_line_errors(stderr) if f"{last.name} fails its sha256" in line], stderr
    assert not (tmp_path / "out" / "sae_weights.safetensors").exists()


def test_ranks_started_with_different_settings_fail_on_every_rank(store, tmp_path):
    port = free_port()
    common = [store.folder, tmp_path / "out", "--d-sae", 32, "--batch-size", 64, "--tokens", 640, "--no-progress"]
    ranks = [start_rank(0, 2, port, [*common, "--k", 4]), start_rank(1, 2, port, [*common, "--k", 8])]
    started = time.time()
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    assert time.time() - started < 60  # no hang
    for rank, (_, stderr) in zip(ranks, outputs):
        assert rank.returncode == 2, stderr
        errors = one_line_errors(stderr)
        assert len(errors) == 1 and "ranks 0 and 1 were started with different settings or data" in errors[0], stderr
        assert "sae.k=4 vs 8" in errors[0], errors[0]
    assert not (tmp_path / "out" / "sae_weights.safetensors").exists()


def test_a_rank_that_never_joins_times_out_with_one_line(store, tmp_path):
    alone = start_rank(0, 2, free_port(), [store.folder, tmp_path / "out", "--d-sae", 32, "--k", 4, "--batch-size",
                                           64, "--tokens", 640], timeout_s=3)
    started = time.time()
    _, stderr = alone.communicate(timeout=120)
    assert time.time() - started < 60
    assert alone.returncode == 2
    errors = one_line_errors(stderr)
    assert len(errors) == 1 and "rank 0 of 2: the ranks did not all join within 3 s" in errors[0], stderr



# -- sharded harvest -----------------------------------------------------------------------------
HARVEST = ["--tokens", 40_000, "--context-len", 64, "--batch-size", 8, "--shard-mb", 0.25, "--no-progress",
           "--hooks", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]


def harvest_command(out: Path, nproc: int = 1) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc-per-node", str(nproc)]
    return [*launcher, "-m", "saelib", "harvest", *map(str, HARVEST), "--out-dir", str(out)]


def folder_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (path relative to it -> contents)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def one_process_stores(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("harvest") / "one"
    run = subprocess.run(harvest_command(out), capture_output=True, text=True, timeout=300, env=env())
    assert run.returncode == 0, run.stderr
    return out


def test_two_ranks_harvest_the_store_one_process_writes(one_process_stores, tmp_path):
    run = subprocess.run(harvest_command(tmp_path / "two", nproc=2), capture_output=True, text=True, timeout=300, env=env())
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("harvested by 2 ranks") == 2  # rank 0 reports each store
    alone, shared = folder_bytes(one_process_stores), folder_bytes(tmp_path / "two")
    assert len(alone) > 300  # many shards per store, so each rank wrote a share of both
    assert alone.keys() == shared.keys()  # no rank's records or locks left behind
    assert [name for name in alone if alone[name] != shared[name]] == []  # shards, manifests, token records
    manifest = tmp_path / "two" / "blocks.1.hook_resid_post" / "manifest.json"
    written = manifest.stat().st_mtime_ns
    again = subprocess.run(harvest_command(tmp_path / "two", nproc=2), capture_output=True, text=True, timeout=300, env=env())
    assert again.returncode == 0, again.stderr
    assert manifest.stat().st_mtime_ns == written  # a finished store is only read


def test_a_killed_harvest_rank_resumes_without_redoing_finished_shards(one_process_stores, tmp_path):
    out = tmp_path / "two"
    launcher = subprocess.Popen(harvest_command(out, nproc=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env())
    records = out / "blocks.1.mlp.hook_post"
    deadline = time.time() + 120
    # rank 1 writes the second half of the 300-odd MLP shards: wait for a few of its records
    while time.time() < deadline and len([p for p in records.glob("shard_*.json") if int(p.stem[6:]) > 160]) < 5:
        time.sleep(0.02)
    os.kill(rank_pids(launcher)[1], signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    manifest = json.loads((records / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["shards"] == []  # unfinished: nothing listed yet
    kept = {p.name: p.stat().st_mtime_ns for p in records.glob("shard_*.npy") if p.with_suffix(".json").exists()}
    assert kept
    resumed = subprocess.run(harvest_command(out, nproc=2), capture_output=True, text=True, timeout=300, env=env())
    assert resumed.returncode == 0, resumed.stderr
    assert {name: (records / name).stat().st_mtime_ns for name in kept} == kept  # finished shards were not redone
    alone, shared = folder_bytes(one_process_stores), folder_bytes(out)
    assert alone.keys() == shared.keys()
    assert [name for name in alone if alone[name] != shared[name]] == []


def test_a_one_process_run_finishes_a_killed_sharded_harvest(one_process_stores, tmp_path):
    """Without torchrun the store is resumed from its listed shards: the result is still
    the same folder, with the ranks' shard records gone."""
    out = tmp_path / "two"
    launcher = subprocess.Popen(harvest_command(out, nproc=2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env())
    records = out / "blocks.1.mlp.hook_post"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(records.glob("shard_*.json"))) < 10:
        time.sleep(0.02)
    os.kill(rank_pids(launcher)[0], signal.SIGKILL)
    launcher.communicate(timeout=120)
    finished = subprocess.run(harvest_command(out), capture_output=True, text=True, timeout=300, env=env())
    assert finished.returncode == 0, finished.stderr
    alone, shared = folder_bytes(one_process_stores), folder_bytes(out)
    assert alone.keys() == shared.keys()
    assert [name for name in alone if alone[name] != shared[name]] == []


def test_harvest_ranks_started_with_different_tokens_fail_on_every_rank(tmp_path):
    port = free_port()
    ranks = []
    for rank, tokens in enumerate([4000, 6000]):
        command = [sys.executable, "-m", "saelib", "harvest", "--hooks", "blocks.0.hook_resid_post", "--tokens",
                   str(tokens), "--context-len", "64", "--no-progress", "--out-dir", str(tmp_path / "stores")]
        ranks.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                              MASTER_PORT=str(port), SAELIB_DIST_TIMEOUT="60")))
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    for rank, (_, stderr) in zip(ranks, outputs):
        assert rank.returncode == 2, stderr
        errors = one_line_errors(stderr)
        assert len(errors) == 1 and "ranks 0 and 1 were started with different harvests (contexts_sha256=" in errors[0], stderr
    assert not list((tmp_path / "stores").rglob("shard_*"))
