"""Reliability, class 4 (issue 18): long runs tell the user where they stand. The checkpoint
interval is a flag, and the message names the step the checkpoint actually holds."""

import signal
import subprocess
import sys
import time

import numpy as np
import torch

from saelib.store import StoreManifest
from saelib.store_writer import StoreWriter
from saelib.train import STATE_FILE

D_IN, CONTEXT_LEN = 16, 9


def write_store(folder, n_rows=4096):
    manifest = StoreManifest(model="toy", model_fingerprint="f" * 16, hook="blocks.0.hook_resid_post", d_in=D_IN,
                             dtype="float32", shard_rows=1024, context_len=CONTEXT_LEN,
                             n_contexts=n_rows // (CONTEXT_LEN - 1), first_position=1, contexts_sha256="")
    writer = StoreWriter(folder, manifest, np.zeros((manifest.n_contexts, CONTEXT_LEN), dtype=np.int32))
    writer.append(torch.randn(n_rows, D_IN, generator=torch.Generator().manual_seed(0)))
    return writer.close()


def train_command(store, out, *extra):
    return [sys.executable, "-m", "saelib", "train", str(store.folder), str(out), "--d-sae", "32", "--k", "4",
            "--batch-size", "64", *map(str, extra)]


def test_the_stop_message_names_the_step_the_checkpoint_holds(tmp_path):
    store = write_store(tmp_path / "store")
    out = tmp_path / "sae"
    # stopped by --max-minutes after the first step, between two logged rows (every 7 steps)
    run = subprocess.run(train_command(store, out, "--tokens", 64 * 32, "--log-every", 7, "--max-minutes", 1e-6),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-1500:]
    saved = torch.load(out / "checkpoint" / STATE_FILE, weights_only=True)["step"]
    assert f"stopped at step {saved} of 32" in run.stdout and f"holds step {saved}" in run.stdout
    assert "rerun the same command to continue" in run.stdout
    run = subprocess.run(train_command(store, out, "--tokens", 64 * 32, "--log-every", 7), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "trained step 32 of 32" in run.stdout and "at logged step 32" in run.stdout


def test_the_checkpoint_interval_is_a_flag_and_a_killed_run_resumes(tmp_path):
    store = write_store(tmp_path / "store")
    out = tmp_path / "sae"
    command = train_command(store, out, "--tokens", 64 * 600, "--checkpoint-minutes", 1e-4, "--no-progress")
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoint" / STATE_FILE
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.3)  # a few more checkpoints, then a hard kill in the middle of the run
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "the run finished before it could be killed: make it longer"
    killed_at = torch.load(state, weights_only=True)["step"]
    assert 0 < killed_at < 600  # checkpoints every 6 ms, not every 5 minutes
    # resumed with the default interval (the interval may change between runs of one training)
    finished = subprocess.run(train_command(store, out, "--tokens", 64 * 600, "--no-progress"), capture_output=True,
                              text=True, timeout=600)
    assert finished.returncode == 0 and "trained step 600 of 600" in finished.stdout, finished.stderr[-1500:]
