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


def test_reads_are_float32_whatever_torchs_default_dtype(tmp_path, acts_ND):
    store = write_store(tmp_path / "s", acts_ND, n_contexts=10, dtype="float16")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        rows = store.rows(0, 40)
        batch = next(store.iter_batches(8, shuffle=False))
    finally:
        torch.set_default_dtype(before)
    assert rows.dtype == batch.dtype == torch.float32
    assert torch.equal(rows, acts_ND.half().float()) and torch.equal(batch, rows[:8])


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


# -- the write path: shard images, unbuffered writes, statistics -------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_shard_images_are_the_files_np_save_writes(tmp_path, dtype):
    import hashlib
    import io

    from saelib.store_writer import ShardImage

    rows_ND = torch.randn(300, 48, generator=torch.Generator().manual_seed(1)).to(getattr(torch, dtype))
    image = ShardImage(300, 48, dtype)
    for rows, name in ((300, "full"), (170, "closed_early")):  # a shard closed before it filled gets its own header
        image.start(300)
        for lo in range(0, rows, 64):  # arriving in pieces, hashed as they come
            image.add(rows_ND[lo : min(rows, lo + 64)])
        sha256 = image.seal()
        path = tmp_path / f"{name}.npy"
        image.save(path)
        expected = io.BytesIO()
        np.save(expected, rows_ND[:rows].numpy())
        assert path.read_bytes() == expected.getvalue()
        assert sha256 == hashlib.sha256(expected.getvalue()).hexdigest()


def test_a_second_writer_reuses_the_first_writers_image_memory(tmp_path, acts_ND):
    # touching fresh memory is what costs on a virtual machine; a notebook harvests again and
    # again in one process, so closed writers hand their shard images on
    import saelib.store_writer as store_writer

    first = write_store(tmp_path / "a", acts_ND, n_contexts=10, dtype="float16")
    mapped = store_writer.mapped_bytes
    other_ND = -acts_ND
    second = write_store(tmp_path / "b", other_ND, n_contexts=10, dtype="float16")
    assert store_writer.mapped_bytes == mapped  # no new memory: the first writer's images served
    # and the reused memory holds nothing of the first store: both read back exactly, verified
    for store, rows in ((first, acts_ND), (second, other_ND)):
        store = ActivationStore(store.folder, verify="full")
        read = torch.cat([torch.from_numpy(np.array(store.shard(i))) for i in range(len(store.manifest.shards))])
        assert torch.equal(read, rows.half())


def _page_cache_pages(path) -> int:
    """Pages of ``path`` held in the page cache (``mincore`` over a mapping of the file)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(path, "r+b") as handle, mmap.mmap(handle.fileno(), size) as mapping:
        vector = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        anchor = ctypes.c_char.from_buffer(mapping)
        try:
            assert libc.mincore(ctypes.addressof(anchor), size, vector) == 0, ctypes.get_errno()
        finally:
            del anchor  # the mapping cannot close while a ctypes object views it
    return sum(v & 1 for v in vector)


def _accepts_direct_io(folder) -> bool:
    import errno
    import os

    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        return False
    return True


@pytest.mark.skipif(not hasattr(__import__("os"), "O_DIRECT"), reason="O_DIRECT is Linux-only")
def test_unbuffered_writes_bypass_the_page_cache(tmp_path):
    import mmap

    from saelib.files import write_unbuffered

    if not _accepts_direct_io(tmp_path):
        pytest.skip(f"{tmp_path} has no direct I/O")
    size = 5 * mmap.PAGESIZE + 123  # the last page is padded in memory, not on disk
    memory = mmap.mmap(-1, 6 * mmap.PAGESIZE)
    memory[:] = np.random.default_rng(0).integers(0, 256, len(memory), dtype=np.uint8).tobytes()
    buffered = tmp_path / "buffered.bin"
    buffered.write_bytes(memory[:size])
    assert _page_cache_pages(buffered) > 0  # the baseline: a plain write leaves its pages cached
    path = tmp_path / "unbuffered.bin"
    write_unbuffered(path, memory, size)
    assert _page_cache_pages(path) == 0
    assert path.read_bytes() == memory[:size]


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_unbuffered_writes_fall_back_where_direct_io_is_refused(tmp_path, monkeypatch, refused_at):
    # Simulated: every file system at hand takes O_DIRECT (tmpfs too, since Linux 6.6); some
    # (FUSE, older ZFS) refuse it with EINVAL when the file is opened or first written.
    import errno
    import mmap
    import os

    from saelib.files import write_unbuffered

    real_open, real_write = os.open, os.write
    direct_fds = set()

    def open_(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            if refused_at == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(path, flags, *args)
            direct_fds.add(fd)
            return fd
        return real_open(path, flags, *args)

    def write_(fd, data):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "write", write_)
    memory = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    memory[:] = bytes(range(256)) * (len(memory) // 256)
    write_unbuffered(tmp_path / "f.bin", memory, mmap.PAGESIZE + 7)
    assert (tmp_path / "f.bin").read_bytes() == memory[: mmap.PAGESIZE + 7]


def test_statistics_summed_block_by_block_match_float64(monkeypatch):
    from saelib import store_writer

    rows_ND = (torch.randn(1000, 24, generator=torch.Generator().manual_seed(3)) * 5 + 2).half()
    monkeypatch.setattr(store_writer, "_PIECE_BYTES", 24 * 2 * 37)  # pieces of 37 float16 rows, the last one short
    total_D, total_norm, total_sq = store_writer._sums_of(rows_ND)
    reference = rows_ND.double()
    assert np.allclose(total_D, reference.sum(0).numpy(), rtol=1e-6)
    assert total_norm == pytest.approx(float(reference.norm(dim=1).sum()), rel=1e-6)
    assert total_sq == pytest.approx(float(reference.square().sum()), rel=1e-6)


def test_rows_may_arrive_as_a_strided_batch_view(tmp_path, acts_ND):
    """Harvest hands the writer [batch, positions, d] views (BOS cut off), not copied rows."""
    with_bos = torch.cat([torch.full((10, 1, D_IN), 99.0), acts_ND.view(10, 4, D_IN)], dim=1)  # [10, 5, D]
    contexts = np.arange(10 * CONTEXT_LEN, dtype=np.int32).reshape(10, CONTEXT_LEN)
    for dtype in ("float32", "float16"):
        writer = StoreWriter(tmp_path / dtype, make_manifest(10, dtype=dtype), contexts)
        for lo in range(0, 10, 3):
            writer.append(with_bos[lo : lo + 3, 1:])  # not contiguous
        store = writer.close()
        assert torch.equal(store.rows(0, 40), acts_ND.to(getattr(torch, dtype)).float())


def test_float32_rows_whose_squares_overflow_are_refused(tmp_path, acts_ND):
    # A norm above 3e38 made the store's mean squared norm inf, and the finished store was
    # then refused on every open as "damaged statistics".
    big = acts_ND.clone()
    big[13, 1] = 1e20
    with pytest.raises(NonFiniteActivationsError, match="too large for float32 statistics.*context 3, position 2"):
        write_store(tmp_path / "s", big, n_contexts=10)


def test_a_bad_row_leaves_its_whole_batch_unwritten_across_a_shard_boundary(tmp_path, acts_ND):
    bad = acts_ND.clone()
    bad[8, 0] = float("inf")  # the batch of rows 5..9 would complete shard 0 (rows 0..6)
    with pytest.raises(NonFiniteActivationsError, match="NaN or inf"):
        write_store(tmp_path / "s", bad, n_contexts=10, append_rows=5)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["shards"] == []


def _folder_files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_refused_batch_leaves_the_writer_as_it_was(tmp_path, acts_ND, dtype):
    # Rows are cast into the shard images, hashed and summed before the whole batch is checked;
    # a bad row late in a batch that fills several shards must undo all of that, so that the
    # good batch appended after it gives the store a clean run writes, byte for byte.
    clean = write_store(tmp_path / "clean", acts_ND, n_contexts=10, shard_rows=4, dtype=dtype, append_rows=3)
    contexts = np.arange(10 * CONTEXT_LEN, dtype=np.int32).reshape(10, CONTEXT_LEN)
    writer = StoreWriter(tmp_path / "s", make_manifest(10, 4, dtype), contexts)
    writer.append(acts_ND[:3])  # one row into shard 0 is left buffered
    bad = acts_ND[3:30].clone()
    bad[-1, 0] = float("nan")  # the batch would fill shards 0..6 (rows 3..29)
    with pytest.raises(NonFiniteActivationsError, match="1 activation vectors.*context 7, position 2"):
        writer.append(bad)
    assert writer.next_row == 3
    for lo in range(3, 40, 3):
        writer.append(acts_ND[lo : lo + 3])
    writer.close()
    assert _folder_files(tmp_path / "s") == _folder_files(clean.folder)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("d_in", [1, 7, 64])
def test_image_statistics_are_those_of_the_shard_to_the_bit(monkeypatch, dtype, d_in):
    # One writer sums a shard piece by piece as rows arrive in batches of any size; several
    # ranks and a resumed store sum the shard's file with _sums_of. The two must agree exactly.
    import hashlib
    import io

    from saelib import store_writer
    from saelib.store_writer import ShardImage

    generator = torch.Generator().manual_seed(d_in)
    rows_ND = (torch.randn(301, d_in, generator=generator) * 4 + 1).to(getattr(torch, dtype))
    monkeypatch.setattr(store_writer, "_PIECE_BYTES", 13 * d_in * rows_ND.element_size())  # pieces of 13 rows
    image = ShardImage(301, d_in, dtype)
    for rows in (301, 290, 169):  # full, closed early mid-piece, closed early at a piece's end (13 * 13)
        image.start(301)
        at = 0
        while at < rows:  # batches of 1 to 40 rows, not aligned with the pieces
            step = min(rows - at, int(torch.randint(1, 41, (1,), generator=generator)))
            image.add(rows_ND[at : at + step])
            at += step
        sha256 = image.seal()
        expected = io.BytesIO()
        np.save(expected, rows_ND[:rows].numpy())
        assert sha256 == hashlib.sha256(expected.getvalue()).hexdigest()
        total_D, norm, sq = image.sums()
        ref_D, ref_norm, ref_sq = store_writer._sums_of(rows_ND[:rows])
        assert total_D.tobytes() == ref_D.tobytes() and (norm, sq) == (ref_norm, ref_sq)
        reference = rows_ND[:rows].double()
        assert np.allclose(total_D, reference.sum(0).numpy(), rtol=1e-5, atol=1e-9)
    image.release()
