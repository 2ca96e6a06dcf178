"""The activation store: round-trip, atomic shards, resume, corruption and mismatch errors."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from saelib.store import (
    ActivationStore,
    CorruptShardError,
    NonFiniteActivationsError,
    StoreError,
    StoreManifest,
    StoreMismatchError,
)
from saelib.store_writer import StoreWriter

D_IN, CONTEXT_LEN = 6, 5  # BOS skipped: 4 rows per context


def make_manifest(n_contexts: int, shard_rows: int = 7, dtype: str = "float32") -> StoreManifest:
    return StoreManifest(
        model="toy", model_fingerprint="f" * 16, hook="blocks.0.hook_resid_post", d_in=D_IN, dtype=dtype,
        shard_rows=shard_rows, context_len=CONTEXT_LEN, n_contexts=n_contexts, first_position=1, contexts_sha256="",
    )


def write_store(folder, acts_ND, n_contexts, shard_rows=7, dtype="float32", append_rows=3):
    contexts = np.arange(n_contexts * CONTEXT_LEN, dtype=np.int32).reshape(n_contexts, CONTEXT_LEN)
    writer = StoreWriter(folder, make_manifest(n_contexts, shard_rows, dtype), contexts)
    for lo in range(0, len(acts_ND), append_rows):
        writer.append(acts_ND[lo : lo + append_rows])
    return writer.close()


@pytest.fixture
def acts_ND():
    return torch.randn(40, D_IN, generator=torch.Generator().manual_seed(0)) * 3 + 1


def test_round_trip_in_order_with_fixed_size_shards_and_stats(tmp_path, acts_ND):
    store = write_store(tmp_path / "s", acts_ND, n_contexts=10)
    assert store.manifest.complete and len(store) == 40
    assert [s.rows for s in store.manifest.shards] == [7, 7, 7, 7, 7, 5]
    assert torch.equal(store.rows(0, 40), acts_ND)
    assert torch.equal(store.rows(5, 16), acts_ND[5:16])  # spans three shards
    assert torch.equal(store.rows(33, 60), acts_ND[33:])  # a range past the end is clipped, as a slice is
    assert store.rows(45, 50).shape == (0, D_IN)
    assert torch.allclose(store.mean, acts_ND.mean(0), atol=1e-5)
    assert store.manifest.mean_norm == pytest.approx(acts_ND.norm(dim=1).mean().item(), rel=1e-5)
    scaled = acts_ND * store.norm_scale
    assert (scaled.square().sum(1).mean() / D_IN).item() == pytest.approx(1.0, rel=1e-5)


def test_rows_map_back_to_their_tokens(tmp_path, acts_ND):
    store = write_store(tmp_path / "s", acts_ND, n_contexts=10)
    context, position = store.locate(np.array([0, 3, 4, 39]))
    assert context.tolist() == [0, 0, 1, 9] and position.tolist() == [1, 4, 1, 4]  # BOS skipped
    assert store.tokens_of(4) == CONTEXT_LEN + 1


def test_float16_store_rounds_to_half_precision(tmp_path, acts_ND):
    store = write_store(tmp_path / "s", acts_ND, n_contexts=10, dtype="float16")
    assert store.shard(0).dtype == np.float16
    assert torch.equal(store.rows(0, 40), acts_ND.half().float())


def test_shuffled_batches_cover_every_row_once_with_bounded_buffer(tmp_path, acts_ND):
    store = write_store(tmp_path / "s", acts_ND, n_contexts=10)
    batches = list(store.iter_batches(batch_size=4, seed=1, buffer_rows=8, chunk_rows=3, drop_last=False))
    assert all(b.dtype == torch.float32 and b.shape[1] == D_IN for b in batches)
    seen = torch.cat(batches)
    assert len(seen) == 40 and not torch.equal(seen, acts_ND)  # every row, new order
    as_set = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731
    assert as_set(seen) == as_set(acts_ND)
    again = torch.cat(list(store.iter_batches(batch_size=4, seed=1, buffer_rows=8, chunk_rows=3, drop_last=False)))
    assert torch.equal(seen, again)  # a fixed function of the seed
    ordered = torch.cat(list(store.iter_batches(batch_size=4, shuffle=False, drop_last=False)))
    assert torch.equal(ordered, acts_ND)


def test_batch_rows_name_the_rows_each_batch_holds_and_gather_reads_them(tmp_path, acts_ND):
    """``iter_batch_rows`` gives the stream's row numbers without reading activations;
    ``gather`` reads any rows, in any order, across shards, as indexing the whole store does."""
    store = write_store(tmp_path / "s", acts_ND, n_contexts=10)  # several shards
    assert len(store.manifest.shards) > 1
    kwargs = dict(batch_size=4, seed=1, buffer_rows=8, chunk_rows=3, drop_last=False)
    rows = list(store.iter_batch_rows(**kwargs))
    assert sorted(np.concatenate(rows).tolist()) == list(range(40))
    for numbers, batch in zip(rows, store.iter_batches(**kwargs), strict=True):
        assert torch.equal(batch, acts_ND[numbers])
    scattered = np.array([39, 0, 17, 17, 5, 38])  # across shards, unsorted, a repeat
    assert torch.equal(store.gather(scattered), acts_ND[scattered])
    assert store.gather(np.array([], dtype=np.int64)).shape == (0, D_IN)
    with pytest.raises(IndexError, match="outside store"):
        store.gather(np.array([3, 40]))


def test_killed_writer_leaves_only_whole_listed_shards_and_resumes(tmp_path, acts_ND):
    folder = tmp_path / "s"
    contexts = np.zeros((10, CONTEXT_LEN), dtype=np.int32)
    writer = StoreWriter(folder, make_manifest(10), contexts)
    writer.append(acts_ND[:17])  # two shards written, 3 rows buffered
    writer._wait_for_writes()
    (folder / "shard_00002.npy.tmp").write_bytes(b"half a shard")  # a write cut short by the kill
    del writer
    partial = ActivationStore(folder, verify="full")
    assert len(partial) == 14 and not partial.manifest.complete

    resumed = StoreWriter(folder, make_manifest(10), contexts)
    assert resumed.start_row == 14
    resumed.seek(12)  # a harvest restarts at a context boundary, before where the store stopped
    resumed.append(acts_ND[12:40])
    store = resumed.close()
    assert store.manifest.complete and torch.equal(store.rows(0, 40), acts_ND)
    assert torch.allclose(store.mean, acts_ND.mean(0), atol=1e-5)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shard_is_refused_with_a_clear_error(tmp_path, acts_ND, damage):
    store = write_store(tmp_path / "s", acts_ND, n_contexts=10)
    path = tmp_path / "s" / "shard_00001.npy"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-10])
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        path.unlink()
    with pytest.raises(CorruptShardError, match="shard_00001.npy.*harvest again"):
        ActivationStore(tmp_path / "s").rows(0, 40)
    del store


def test_resume_rewrites_from_the_first_damaged_shard(tmp_path, acts_ND):
    folder = tmp_path / "s"
    write_store(folder, acts_ND, n_contexts=10)
    path = folder / "shard_00003.npy"
    path.write_bytes(path.read_bytes()[:-4])
    contexts = np.arange(10 * CONTEXT_LEN, dtype=np.int32).reshape(10, CONTEXT_LEN)
    writer = StoreWriter(folder, make_manifest(10), contexts)
    assert writer.start_row == 21 and not writer.done
    # the manifest on disk no longer lists the dropped shards, even before anything is appended
    on_disk = StoreManifest.from_json((folder / "manifest.json").read_text())
    assert on_disk.n_rows == 21 and all((folder / info.file).exists() for info in on_disk.shards)
    writer.seek(20)
    writer.append(acts_ND[20:])
    store = writer.close()
    assert torch.equal(store.rows(0, 40), acts_ND)
    assert torch.allclose(store.mean, acts_ND.mean(0), atol=1e-5)


def test_non_finite_activations_are_refused_before_writing(tmp_path, acts_ND):
    bad = acts_ND.clone()
    bad[9, 2] = float("nan")
    with pytest.raises(NonFiniteActivationsError, match="context 2, position 2"):
        write_store(tmp_path / "s", bad, n_contexts=10, append_rows=10)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert sum(s["rows"] for s in manifest["shards"]) <= 7  # only the shard before the bad batch


def test_float16_overflow_counts_as_non_finite(tmp_path, acts_ND):
    big = acts_ND.clone()
    big[0, 0] = 1e6
    with pytest.raises(NonFiniteActivationsError, match="float32"):
        write_store(tmp_path / "s", big, n_contexts=10, dtype="float16")


def test_require_names_the_mismatch(tmp_path, acts_ND):
    store = write_store(tmp_path / "s", acts_ND, n_contexts=10)
    store.require(d_in=D_IN, hook="blocks.0.hook_resid_post", model_name="toy")
    with pytest.raises(StoreMismatchError, match="d_in mismatch.*expects vectors of length 8.*holds length 6"):
        store.require(d_in=8)
    with pytest.raises(StoreMismatchError, match="hook"):
        store.require(hook="blocks.1.hook_resid_post")
    with pytest.raises(StoreMismatchError, match="model 'toy'"):
        store.require(model_name="gpt2")


def test_resuming_with_other_settings_is_refused(tmp_path, acts_ND):
    write_store(tmp_path / "s", acts_ND, n_contexts=10)
    contexts = np.arange(10 * CONTEXT_LEN, dtype=np.int32).reshape(10, CONTEXT_LEN)
    other = make_manifest(10, dtype="float16")
    with pytest.raises(StoreMismatchError, match="dtype"):
        StoreWriter(tmp_path / "s", other, contexts)
    with pytest.raises(StoreMismatchError, match="contexts_sha256"):
        StoreWriter(tmp_path / "s", make_manifest(10), contexts + 1)
    StoreWriter(tmp_path / "s", other, contexts, overwrite=True).close()


def test_the_same_model_through_another_backend_may_resume(tmp_path, acts_ND):
    # Another TransformerLens backend hashes the same weights differently; a matching model
    # signature (what the model computes) identifies it. A different signature is refused.
    signature = [0.5] * 64
    folder = tmp_path / "s"
    first = make_manifest(10)
    first.model_signature = signature
    contexts = np.arange(10 * CONTEXT_LEN, dtype=np.int32).reshape(10, CONTEXT_LEN)
    writer = StoreWriter(folder, first, contexts)
    writer.append(acts_ND)
    writer.close()
    other_backend = dataclasses.replace(make_manifest(10), model_fingerprint="another-hash",
                                        model_signature=[v + 1e-5 for v in signature])
    assert torch.equal(StoreWriter(folder, other_backend, contexts).close().rows(0, 40), acts_ND)
    other_model = dataclasses.replace(other_backend, model_signature=[v + 0.1 for v in signature])
    with pytest.raises(StoreMismatchError, match="model_fingerprint"):
        StoreWriter(folder, other_model, contexts)


def test_missing_store_says_to_harvest(tmp_path):
    with pytest.raises(Exception, match="not an activation store.*harvest"):
        ActivationStore(tmp_path)


def test_reopening_a_finished_store_writes_nothing(tmp_path):
    from saelib.store import StoreManifest
    from saelib.store_writer import StoreWriter

    def open_writer():
        manifest = StoreManifest(model="m", model_fingerprint="f", hook="h", d_in=4, dtype="float32", shard_rows=10,
                                 context_len=11, n_contexts=3, first_position=1, contexts_sha256="")
        return StoreWriter(tmp_path, manifest, np.zeros((3, 11), dtype=np.int32))

    writer = open_writer()
    writer.append(torch.ones(30, 4))
    writer.close()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    # Several processes may open a finished store at once (notebooks, training jobs): none may write.
    reopened = open_writer()
    reopened.seek(0)
    assert reopened.done and not reopened.wants_rows(30)
    store = reopened.close()
    assert store.manifest.complete and len(store) == 30
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_special_token_rows_are_left_out_on_request(tmp_path, acts_ND):
    """Mid-sequence <|endoftext|> rows stay in the store (its layout is fixed) but readers
    can leave them out: ``special_rows`` marks them, ``iter_batches(skip_special=True)`` drops them."""
    store = write_store(tmp_path / "s", acts_ND, n_contexts=10)
    special = [int(t) for t in store.tokens_of(np.array([3, 17, 22]))]
    manifest = json.loads((store.folder / "manifest.json").read_text())
    manifest["special_token_ids"] = special
    (store.folder / "manifest.json").write_text(json.dumps(manifest))
    store = ActivationStore(store.folder)
    assert store.special_rows(0, 40).nonzero()[0].tolist() == [3, 17, 22]
    assert store.fingerprint()["special_token_ids"] == special
    kept = torch.cat(list(store.iter_batches(batch_size=4, seed=2, buffer_rows=8, chunk_rows=3, drop_last=False,
                                             skip_special=True)))
    expected = acts_ND[[r for r in range(40) if r not in (3, 17, 22)]]
    assert len(kept) == 37
    assert sorted(map(tuple, kept.tolist())) == sorted(map(tuple, expected.tolist()))
    everything = torch.cat(list(store.iter_batches(batch_size=4, seed=2, drop_last=False)))
    assert len(everything) == 40


def test_rows_past_the_windows_are_refused(tmp_path, acts_ND):
    # A resumed writer counts from start_row; appending from row 0 without seek(0) used to
    # add every row a second time to a store then marked complete.
    write_store(tmp_path / "s", acts_ND, n_contexts=10)
    contexts = np.arange(10 * CONTEXT_LEN, dtype=np.int32).reshape(10, CONTEXT_LEN)
    writer = StoreWriter(tmp_path / "s", make_manifest(10), contexts)
    with pytest.raises(StoreError, match="lie past the 40 rows its token windows hold.*seek"):
        writer.append(acts_ND)
    writer.seek(0)
    writer.append(acts_ND)  # from the start: every row already held, nothing written
    assert len(writer.close()) == 40
