"""Several SAEs from one read of the data (issue 21): ``train_many`` / ``fit_together`` give
each SAE exactly the run it gets alone, read every batch once, and resume trainers that
stopped at different steps."""

import pytest
import torch

from saelib.sae import SAEConfig, make_sae
from saelib.train import SAETrainer, TrainConfig, fit_together, sweep, train_many, train_sae

D = 16


class CountingSource:
    """A callable source of the same 30 batches on every call, counting batches handed out."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        atoms = torch.randn(32, D, generator=generator)
        codes = (torch.rand(30 * 64, 32, generator=generator) < 0.1) * torch.rand(30 * 64, 32, generator=generator)
        self.data = (codes @ atoms).split(64)
        self.served = 0

    def __call__(self):
        for batch in self.data:
            self.served += 1
            yield batch


RUNS = {
    "topk_k2": (SAEConfig(d_in=D, d_sae=48, architecture="topk", k=2), {}),
    "topk_k6": (SAEConfig(d_in=D, d_sae=48, architecture="topk", k=6), {"dead_tokens": 128}),
    "relu": (SAEConfig(d_in=D, d_sae=48, architecture="relu"), {"l1_coefficient": 0.2, "total_tokens": 64 * 20}),
}


def cfg(**changes) -> TrainConfig:
    return TrainConfig(**{"total_tokens": 64 * 30, "batch_size": 64, "lr": 3e-3, "lr_warmup_steps": 3,
                          "log_every": 5, "progress": False, **changes})


def weights(sae):
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def test_each_sae_trained_together_is_the_sae_trained_alone():
    source = CountingSource()
    together = train_many({name: (sae_cfg, cfg(**changes)) for name, (sae_cfg, changes) in RUNS.items()}, source)
    assert source.served == 30  # one read for the three SAEs (the relu one stops after 20 batches)
    for name, (sae_cfg, changes) in RUNS.items():
        alone = train_sae(sae_cfg, CountingSource(), cfg(**changes))
        assert together[name].step == cfg(**changes).steps()
        for key, value in weights(alone.sae).items():
            assert torch.equal(value, weights(together[name].sae)[key]), (name, key)
        assert together[name].metrics.fvu.tolist() == alone.metrics.fvu.tolist()
    assert together["topk_k6"].metrics.fvu.iloc[-1] < together["topk_k2"].metrics.fvu.iloc[-1]  # not one SAE thrice


def test_trainers_resumed_at_different_steps_each_finish_their_own_run(tmp_path):
    (sae_a, changes_a), (sae_b, changes_b) = RUNS["topk_k2"], RUNS["topk_k6"]
    cfg_a, cfg_b = cfg(out_dir=str(tmp_path / "a"), **changes_a), cfg(out_dir=str(tmp_path / "b"), **changes_b)
    train_sae(sae_a, CountingSource(), cfg_a, max_steps=12)  # a stopped at step 12, b never started
    source = CountingSource()
    trainers = [SAETrainer(make_sae(sae_a), cfg_a), SAETrainer(make_sae(sae_b), cfg_b)]
    assert [t.step for t in trainers] == [12, 0]
    resumed = fit_together(trainers, source)
    assert source.served == 30
    for result, (sae_cfg, changes) in zip(resumed, [RUNS["topk_k2"], RUNS["topk_k6"]]):
        alone = train_sae(sae_cfg, CountingSource(), cfg(**changes))
        for key, value in weights(alone.sae).items():
            assert torch.equal(value, weights(result.sae)[key]), key


def test_runs_that_read_the_data_differently_are_refused_together():
    trainers = [SAETrainer(make_sae(RUNS["topk_k2"][0]), cfg()), SAETrainer(make_sae(RUNS["topk_k6"][0]), cfg(seed=1))]
    with pytest.raises(ValueError, match=r"must share seed \(here 0 and 1\)"):
        fit_together(trainers, CountingSource())


def test_sweep_reads_the_data_once_and_gives_each_point_its_own_run():
    source = CountingSource()
    table = sweep(SAEConfig(d_in=D, d_sae=48, architecture="topk"), cfg(), source, {"k": [2, 6]})
    assert source.served == 30
    alone = train_sae(SAEConfig(d_in=D, d_sae=48, architecture="topk", k=6), CountingSource(), cfg())
    assert table.set_index("k").fvu[6] == alone.metrics.fvu.iloc[-1]


def test_dense_kernels_train_the_same_sae_as_the_sparse_ones():
    """TrainConfig.kernels: plain dense autograd and the sparse kernels take the same steps
    up to float rounding; 'auto' on a CPU is the sparse path (bitwise)."""
    sae_cfg, changes = RUNS["topk_k6"]  # AuxK on too
    results = {kernels: train_sae(sae_cfg, CountingSource(), cfg(kernels=kernels, **changes))
               for kernels in ("sparse", "dense", "auto")}
    sparse, dense, auto = (weights(results[name].sae) for name in ("sparse", "dense", "auto"))
    for key in sparse:
        assert torch.equal(auto[key], sparse[key]), key
        torch.testing.assert_close(dense[key], sparse[key], rtol=1e-4, atol=1e-4, msg=key)
    assert any(not torch.equal(dense[key], sparse[key]) for key in sparse)  # the dense path did run
    with pytest.raises(ValueError, match="kernels 'fast': choose one of sparse, dense, auto"):
        cfg(kernels="fast")


def test_the_kernel_timing_a_gpu_would_use_runs_both_paths():
    """The one-off timing ``auto`` runs on a GPU, run here on the CPU at a tiny shape."""
    from saelib.kernels import dense_over_sparse_time

    ratio = dense_over_sparse_time("cpu", 16, 64, 4, rows=256)
    assert 0 < ratio < float("inf")


def test_the_command_line_sweep_trains_each_point_as_its_own_command_would(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from test_training_guards import write_store

    store = write_store(tmp_path / "store", torch.cat(CountingSource().data))
    common = [sys.executable, "-m", "saelib", "train", str(store.folder)]
    options = ["--d-sae", "48", "--batch-size", "64", "--tokens", "1280", "--no-progress"]
    swept = subprocess.run([*common, str(tmp_path / "sweep"), *options, "--sweep", "k=2,6"], capture_output=True, text=True)
    assert swept.returncode == 0, swept.stderr
    assert swept.stdout.count("trained step 20 of 20") == 2
    alone = subprocess.run([*common, str(tmp_path / "alone"), *options, "--k", "6"], capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr
    sweep_k6, alone_k6 = (load_file(tmp_path / p / "sae_weights.safetensors") for p in ("sweep/k=6", "alone"))
    assert all(torch.equal(sweep_k6[name], alone_k6[name]) for name in alone_k6)
    sweep_k2 = load_file(tmp_path / "sweep" / "k=2" / "sae_weights.safetensors")
    assert not torch.equal(sweep_k2["W_enc"], sweep_k6["W_enc"])
    bad = subprocess.run([*common, str(tmp_path / "bad"), *options, "--sweep", "kk=2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--sweep 'kk=2': write FIELD=V1,V2" in bad.stderr
    wrong = subprocess.run([*common, str(tmp_path / "bad"), *options, "--sweep", "k=2,abc"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--sweep 'k=2,abc': k takes int values" in wrong.stderr


def harvest_pair(folder, shard_rows=(50, 50)):
    """Two stores of one 'harvest' (same token windows, a special token in them): a residual
    stream and an MLP output carrying different planted directions, row r the same token in each."""
    from saelib.store import StoreManifest
    from saelib.store_writer import StoreWriter

    generator = torch.Generator().manual_seed(1)
    n_contexts, context_len = 40, 33  # 32 rows per context after BOS: 1280 rows
    contexts = torch.randint(1, 50, (n_contexts, context_len), generator=generator).numpy().astype("int32")
    contexts[:, 5] = 0  # one special token per window: its rows are left out of training
    stores = {}
    for hook, rows in zip(("blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"), shard_rows):
        atoms = torch.randn(32, D, generator=generator)
        codes = (torch.rand(n_contexts * 32, 32, generator=generator) < 0.1) * torch.rand(n_contexts * 32, 32, generator=generator)
        manifest = StoreManifest(model="toy", model_fingerprint="f" * 16, hook=hook, d_in=D, dtype="float32",
                                 shard_rows=rows, context_len=context_len, n_contexts=n_contexts, first_position=1,
                                 contexts_sha256="", special_token_ids=[0])
        writer = StoreWriter(folder / hook, manifest, contexts)
        writer.append(codes @ atoms)
        stores[hook] = writer.close()
    return stores


def test_saes_at_several_hooks_share_one_shuffle_and_each_is_its_stand_alone_run(tmp_path):
    stores = harvest_pair(tmp_path)
    runs = {hook: (SAEConfig(d_in=D, d_sae=48, architecture="topk", k=3, hook_name=hook), cfg(total_tokens=64 * 15))
            for hook in stores}
    together = train_many(runs, stores)
    for hook, (sae_cfg, train_cfg) in runs.items():
        alone = train_sae(sae_cfg, stores[hook], train_cfg)
        assert together[hook].step == alone.step == 15
        for key, value in weights(alone.sae).items():
            assert torch.equal(value, weights(together[hook].sae)[key]), (hook, key)
        assert together[hook].sae.cfg.metadata["data"] == stores[hook].fingerprint()
    first, second = (together[hook].sae.W_dec for hook in stores)
    assert not torch.allclose(first, second)  # each trained on its own store's rows


def test_stores_laid_out_differently_or_a_missing_hook_are_refused(tmp_path):
    stores = harvest_pair(tmp_path, shard_rows=(50, 64))
    runs = {hook: (SAEConfig(d_in=D, d_sae=48, architecture="topk", k=3, hook_name=hook), cfg()) for hook in stores}
    with pytest.raises(ValueError, match="cannot be read as one stream: their shard sizes differ"):
        train_many(runs, stores)
    elsewhere = {"x": (SAEConfig(d_in=D, d_sae=48, architecture="topk", k=3, hook_name="blocks.1.hook_resid_post"), cfg())}
    with pytest.raises(ValueError, match="no store for hook 'blocks.1.hook_resid_post'"):
        train_many(elsewhere, stores)


def test_the_cli_trains_one_sae_per_store_from_one_read_into_out_per_hook(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    stores = harvest_pair(tmp_path / "stores")
    options = ["--d-sae", "48", "--k", "3", "--batch-size", "64", "--tokens", str(64 * 12), "--no-progress"]
    run = lambda *args: subprocess.run([sys.executable, "-m", "saelib", "train", *map(str, args), *options],  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    together = run(*(store.folder for store in stores.values()), tmp_path / "together")
    assert together.returncode == 0, together.stderr
    for hook, store in stores.items():
        alone = run(store.folder, tmp_path / hook)
        assert alone.returncode == 0, alone.stderr
        mine, theirs = load_file(tmp_path / "together" / hook / "sae_weights.safetensors"), load_file(tmp_path / hook / "sae_weights.safetensors")
        assert all(torch.equal(mine[name], theirs[name]) for name in theirs), hook
    twice = run(stores["blocks.0.hook_mlp_out"].folder, stores["blocks.0.hook_mlp_out"].folder, tmp_path / "twice")
    assert twice.returncode == 2 and twice.stderr.startswith("error:") and "give one store per hook" in twice.stderr
