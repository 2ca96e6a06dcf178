"""Reliability, class 2 (issue 18): training never ends "successfully" with a useless SAE.
A diverging run stops with the step and the likely cause before anything is saved over good
state; a run that trains nothing writes nothing; a non-finite batch names its store, shard
and row. The command-line cases run as real processes."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from saelib.sae import SAEConfig
from saelib.store import ActivationStore, StoreManifest
from saelib.store_writer import StoreWriter
from saelib.train import STATE_FILE, TrainConfig, TrainingDivergedError, train_sae

D_IN, CONTEXT_LEN = 16, 9  # BOS skipped: 8 rows per context


def write_store(folder, acts_ND: torch.Tensor) -> ActivationStore:
    n_contexts = len(acts_ND) // (CONTEXT_LEN - 1)
    manifest = StoreManifest(model="toy", model_fingerprint="f" * 16, hook="blocks.0.hook_resid_post", d_in=D_IN,
                             dtype="float32", shard_rows=64, context_len=CONTEXT_LEN, n_contexts=n_contexts,
                             first_position=1, contexts_sha256="")
    contexts = np.zeros((n_contexts, CONTEXT_LEN), dtype=np.int32)
    writer = StoreWriter(folder, manifest, contexts)
    writer.append(acts_ND)
    return writer.close()


@pytest.fixture
def store(tmp_path) -> ActivationStore:
    generator = torch.Generator().manual_seed(0)
    return write_store(tmp_path / "store", torch.randn(512, D_IN, generator=generator))


def train_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "saelib", "train", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def sae_cfg(**changes):
    return SAEConfig(d_in=D_IN, d_sae=32, architecture="topk", k=4, **changes)


def test_a_huge_learning_rate_stops_the_command_and_writes_no_sae(store, tmp_path):
    out = tmp_path / "sae"
    run = train_cli(store.folder, out, "--d-sae", 32, "--k", 4, "--batch-size", 64, "--tokens", 2048, "--lr", 1e30)
    assert run.returncode != 0, run.stdout
    assert "training diverged at step" in run.stderr and "lower --lr" in run.stderr
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in run.stderr and len(error_lines) == 1  # one line (besides the progress bar)
    assert not (out / "cfg.json").exists() and not (out / "sae_weights.safetensors").exists()


def test_divergence_keeps_the_last_good_checkpoint(store, tmp_path):
    cfg = TrainConfig(total_tokens=2048, batch_size=64, out_dir=str(tmp_path / "run"), progress=False)
    good = train_sae(sae_cfg(), store, cfg, max_steps=10)
    assert good.metrics.step.iloc[-1] == 10
    checkpoint = tmp_path / "run" / STATE_FILE
    before = checkpoint.read_bytes()
    # the same run resumed, with its later data gone bad: a batch of values whose squares overflow
    def batches():
        generator = torch.Generator().manual_seed(0)
        for _ in range(10):
            yield torch.randn(64, D_IN, generator=generator)
        while True:
            yield torch.full((64, D_IN), 3e38)
    diverging = dataclasses.replace(cfg, out_dir=str(tmp_path / "run2"))
    train_sae(sae_cfg(), batches, diverging, max_steps=10)
    kept = (tmp_path / "run2" / STATE_FILE).read_bytes()
    with pytest.raises(TrainingDivergedError, match=r"step 11: the loss is (nan|inf).*run2.*step 10\) is kept"):
        train_sae(sae_cfg(), batches, diverging)
    assert (tmp_path / "run2" / STATE_FILE).read_bytes() == kept
    assert checkpoint.read_bytes() == before
    rows = [json.loads(r) for r in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)  # no NaN row was logged


def test_nothing_to_train_is_refused(store, tmp_path):
    with pytest.raises(ValueError, match="total_tokens 0 is less than one batch"):
        TrainConfig(total_tokens=0, batch_size=64)
    with pytest.raises(ValueError, match="batch_size 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr nan"):
        TrainConfig(lr=float("nan"))
    small = write_store(tmp_path / "small", torch.randn(32, D_IN))
    with pytest.raises(ValueError, match=f"nothing was trained: store {small.folder} holds 32 rows.*batch of 64"):
        train_sae(sae_cfg(), small, TrainConfig(total_tokens=2048, batch_size=64, progress=False))
    out = tmp_path / "sae"
    run = train_cli(store.folder, out, "--d-sae", 32, "--k", 4, "--batch-size", 64, "--tokens", 0)
    assert run.returncode == 2 and "--tokens: must be a positive integer, got 0" in run.stderr  # refused when parsed
    run = train_cli(store.folder, out, "--d-sae", 32, "--k", 4, "--batch-size", 64, "--tokens", 10)
    assert run.returncode == 2 and "total_tokens 10 is less than one batch (64)" in run.stderr
    assert "Traceback" not in run.stderr and not out.exists()


def test_a_non_finite_row_is_named_by_store_shard_and_row(store, tmp_path):
    # A store written before non-finite rows were refused (or edited since, checksums redone):
    # the trainer names where the bad value sits instead of training on it.
    manifest = store.manifest
    shard = store.folder / manifest.shards[2].file
    values = np.load(shard)
    values[5, 3] = np.nan
    np.save(shard, values)
    from saelib.files import sha256_file

    manifest.shards[2].sha256 = sha256_file(shard)
    (store.folder / "manifest.json").write_text(manifest.to_json())
    reopened = ActivationStore(store.folder)
    with pytest.raises(ValueError, match=r"holds NaN or inf activations: store .*shard_00002.npy, row 5 \(store row 133\); "
                                         r"1 rows in all; harvest that store again"):
        train_sae(sae_cfg(), reopened, TrainConfig(total_tokens=512, batch_size=64, progress=False))


def test_a_store_of_another_hook_or_model_is_refused(tiny_model, tmp_path):
    # Every entry point that combines an SAE, a store (and a model) checks they belong together.
    from saelib.features import FeatureActivations
    from saelib.harvest import HarvestConfig, harvest
    from saelib.metrics import evaluate
    from saelib.models import randomize_weights
    from saelib.sae import make_sae
    from saelib.store import StoreMismatchError

    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (16, 12), generator=torch.Generator().manual_seed(0))
    store = harvest(tiny_model, tokens, HarvestConfig(hooks=["blocks.0.hook_resid_post"], out_dir=str(tmp_path)))[
        "blocks.0.hook_resid_post"]
    d = tiny_model.cfg.d_model
    other_hook = make_sae(SAEConfig(d_in=d, d_sae=64, architecture="topk", k=4, hook_name="blocks.1.hook_resid_post"))
    cfg = TrainConfig(total_tokens=64, batch_size=32, progress=False)
    for use in (lambda: train_sae(other_hook, store, cfg), lambda: FeatureActivations.collect(other_hook, store)):
        with pytest.raises(StoreMismatchError, match="holds activations of hook 'blocks.0.hook_resid_post', but the SAE "
                                                     "reads 'blocks.1.hook_resid_post'"):
            use()
    sae = train_sae(SAEConfig(d_in=d, d_sae=64, architecture="topk", k=4, hook_name="blocks.0.hook_resid_post"),
                    store, cfg).sae
    assert len(evaluate(sae, tiny_model, store, n_rows=64, n_ce_contexts=4)) == 1  # its own model: accepted
    with pytest.raises(StoreMismatchError, match="different model"):
        evaluate(sae, randomize_weights(tiny_model, seed=1), store, n_rows=64, n_ce_contexts=4)


def test_training_on_an_unfinished_store_warns(tmp_path):
    from saelib.train import IncompleteStoreWarning

    manifest = StoreManifest(model="toy", model_fingerprint="f" * 16, hook="blocks.0.hook_resid_post", d_in=D_IN,
                             dtype="float32", shard_rows=64, context_len=CONTEXT_LEN, n_contexts=64,
                             first_position=1, contexts_sha256="")
    writer = StoreWriter(tmp_path / "s", manifest, np.zeros((64, CONTEXT_LEN), dtype=np.int32))
    writer.append(torch.randn(256, D_IN))  # half the rows: a harvest that was stopped
    unfinished = writer.close()
    assert not unfinished.manifest.complete
    cfg = TrainConfig(total_tokens=128, batch_size=64, progress=False)
    with pytest.warns(IncompleteStoreWarning, match=r"incomplete \(256 of 512 rows"):
        train_sae(sae_cfg(), unfinished, cfg)
    finished = write_store(tmp_path / "done", torch.randn(512, D_IN))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteStoreWarning)
        train_sae(sae_cfg(), finished, cfg)  # a finished store: no warning
