"""Harvesting several hooks in one pass into stores, stopping early, resuming after a kill."""

import pytest
import torch

from saelib.harvest import HarvestConfig, harvest, stop_layer
from saelib.models import UnknownHookError, model_fingerprint, randomize_weights
from saelib.store import ActivationStore, StoreMismatchError
from saelib.store_writer import StoreWriter

HOOKS = ["blocks.0.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"]


@pytest.fixture
def tokens_NL(tiny_cfg):
    tokens = torch.randint(1, tiny_cfg.d_vocab, (12, 9), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = 0
    return tokens


def expected_rows(model, tokens_NL, hook, first_position=1):
    _, cache = model.run_with_cache(tokens_NL, names_filter=hook)
    act = cache[hook][:, first_position:]
    return act.reshape(act.shape[0] * act.shape[1], -1)


def test_each_hook_gets_its_store_matching_the_cache(tiny_model, tokens_NL, tmp_path):
    cfg = HarvestConfig(hooks=HOOKS, batch_size=5, dtype="float32", shard_mb=0.001, out_dir=str(tmp_path), progress=False)
    stores = harvest(tiny_model, tokens_NL, cfg)
    assert set(stores) == set(HOOKS)
    for hook, store in stores.items():
        want = expected_rows(tiny_model, tokens_NL, hook)
        assert store.d_in == want.shape[1] and len(store) == 12 * 8
        assert len(store.manifest.shards) > 1 and (tmp_path / hook / "manifest.json").exists()
        torch.testing.assert_close(store.rows(0, len(store)), want, atol=1e-5, rtol=1e-5)
        store.require(model=tiny_model, hook=hook)
    assert stores["blocks.0.attn.hook_z"].d_in == tiny_model.cfg.n_heads * tiny_model.cfg.d_head
    assert stores[HOOKS[0]].tokens_of(8).item() == tokens_NL[1, 1].item()


def test_keeping_bos_adds_position_zero(tiny_model, tokens_NL, tmp_path):
    cfg = HarvestConfig(hooks=HOOKS[:1], skip_bos=False, dtype="float32", out_dir=str(tmp_path), progress=False)
    store = harvest(tiny_model, tokens_NL, cfg)[HOOKS[0]]
    torch.testing.assert_close(store.rows(0, len(store)), expected_rows(tiny_model, tokens_NL, HOOKS[0], 0))


def test_forward_stops_after_the_last_needed_block(tiny_model):
    assert stop_layer(tiny_model, ["blocks.0.hook_resid_post"]) == 1
    assert stop_layer(tiny_model, ["hook_embed", "blocks.1.attn.hook_z"]) == 2
    assert stop_layer(tiny_model, ["ln_final.hook_normalized"]) is None


def test_unknown_hook_is_named_with_suggestions(tiny_model, tokens_NL, tmp_path):
    with pytest.raises(UnknownHookError, match="blocks.0.hook_resid_post"):
        harvest(tiny_model, tokens_NL, HarvestConfig(hooks=["blocks.0.hook_resid_pots"], out_dir=str(tmp_path)))


def test_resume_after_a_kill_equals_an_uninterrupted_harvest(tiny_model, tokens_NL, tmp_path, monkeypatch):
    cfg = HarvestConfig(hooks=HOOKS[:2], batch_size=2, dtype="float32", shard_mb=0.0005, out_dir=str(tmp_path / "a"), progress=False)
    calls = {"n": 0}
    real_append = StoreWriter.append

    def append_then_die(self, acts):
        calls["n"] += 1
        if calls["n"] == 7:  # mid-harvest, after some shards of both hooks are on disk
            raise KeyboardInterrupt
        real_append(self, acts)

    monkeypatch.setattr(StoreWriter, "append", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        harvest(tiny_model, tokens_NL, cfg)
    monkeypatch.setattr(StoreWriter, "append", real_append)
    partial = ActivationStore(tmp_path / "a" / HOOKS[0])
    assert 0 < len(partial) < 96 and not partial.manifest.complete
    resumed = harvest(tiny_model, tokens_NL, cfg)
    fresh = harvest(tiny_model, tokens_NL, HarvestConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "b")}))
    for hook in cfg.hooks:
        assert resumed[hook].manifest.complete
        assert torch.equal(resumed[hook].rows(0, 96), fresh[hook].rows(0, 96))
        assert resumed[hook].manifest.mean == pytest.approx(fresh[hook].manifest.mean, rel=1e-6)


def test_store_of_another_model_is_refused(tiny_model, tokens_NL, tmp_path):
    store = harvest(tiny_model, tokens_NL, HarvestConfig(hooks=HOOKS[:1], out_dir=str(tmp_path), progress=False))[HOOKS[0]]
    other = randomize_weights(tiny_model, seed=1)
    assert model_fingerprint(other) != model_fingerprint(tiny_model)
    with pytest.raises(StoreMismatchError, match="different model"):
        store.require(model=other)
    with pytest.raises(StoreMismatchError, match="model_fingerprint"):
        harvest(other, tokens_NL, HarvestConfig(hooks=HOOKS[:1], out_dir=str(tmp_path), progress=False))


def test_nan_weights_stop_the_harvest_with_a_clear_error(tiny_model, tokens_NL, tmp_path):
    broken = randomize_weights(tiny_model, seed=2)
    with torch.no_grad():
        broken.blocks[0].mlp.W_in[0, 0] = float("nan")
    with pytest.raises(Exception, match="NaN or inf"):
        harvest(broken, tokens_NL, HarvestConfig(hooks=["blocks.0.hook_mlp_out"], out_dir=str(tmp_path), progress=False))


def test_thread_count_changes_speed_not_the_stored_activations(embedded, tmp_path):
    """The thread governor may change the thread count between batches (``adapt_threads``):
    for the embedded model at this batch the bytes written do not depend on it (at 2 x 32
    tokens they would: see ``saelib.threads.follow_load``)."""
    from saelib.data import token_windows

    windows = token_windows(embedded, 48 * 128)
    hooks = ["blocks.2.hook_resid_post", "blocks.2.mlp.hook_post", "blocks.2.hook_mlp_out"]
    before, checksums = torch.get_num_threads(), {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cfg = HarvestConfig(hooks=hooks, batch_size=16, shard_mb=0.5, out_dir=str(tmp_path / str(threads)),
                                progress=False, adapt_threads=False)
            stores = harvest(embedded, windows, cfg)
            checksums[threads] = {hook: [shard.sha256 for shard in store.manifest.shards] for hook, store in stores.items()}
    finally:
        torch.set_num_threads(before)
    assert checksums[1] == checksums[2] and all(len(shards) > 1 for shards in checksums[1].values())


@pytest.mark.parametrize("adapt", [True, False])
def test_harvest_follows_the_machine_load_and_restores_the_threads(tiny_model, tokens_NL, tmp_path, always_busy, adapt):
    cfg = HarvestConfig(hooks=HOOKS[:1], batch_size=2, out_dir=str(tmp_path), progress=False, adapt_threads=adapt)
    store = harvest(tiny_model, tokens_NL, cfg)[HOOKS[0]]
    assert always_busy[:1] == ([1] if adapt else [])  # after the first batch's reading
    assert torch.get_num_threads() == 2  # put back
    torch.testing.assert_close(store.rows(0, len(store)), expected_rows(tiny_model, tokens_NL, HOOKS[0]), atol=1e-3, rtol=1e-3)
