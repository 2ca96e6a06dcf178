"""Write side of an activation store (format and reader: ``saelib.store``): rows appended in
store order, full shards written atomically by a background thread while the next forward
pass runs, running statistics kept in the manifest, and resume after a kill.

Several ranks harvesting one store at once (``torchrun ... harvest``) each write a block of
its shards with ``ShardBlockWriter``: every shard lands as ``shard_NNNNN.npy`` plus a small
record ``shard_NNNNN.json`` (rows, sha256, sums). ``assemble_store`` then lists them all in
the manifest, statistics summed in shard order as one writer would, and removes the
records: the finished folder is the one a single process writes."""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .files import acquire_lock, release_lock, remove_orphan_tmp, sha256_file, write_atomic
from .store import (
    CONTEXTS,
    DTYPES,
    MANIFEST,
    ActivationStore,
    CorruptShardError,
    NonFiniteActivationsError,
    ShardInfo,
    StoreError,
    StoreManifest,
    StoreMismatchError,
)


def _save_npy(array: np.ndarray):
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    return write


def _sums_of(rows_ND: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """(sum of rows [d_in] float64, sum of norms, sum of squared norms) of one shard."""
    values = rows_ND.float()
    sq_norms_N = (values * values).sum(dim=1)
    total_D = (torch.ones(1, len(values)) @ values)[0]  # a matmul: far faster than sum(dim=0)
    return total_D.double().numpy(), float(sq_norms_N.sqrt().sum()), float(sq_norms_N.double().sum())


def _stored(acts_ND: torch.Tensor, manifest: StoreManifest, first_row: int) -> torch.Tensor:
    """Rows cast to the store's dtype on the CPU, refused with their context and position if
    any is NaN or inf (checked after the cast, so values that overflow float16 are caught)."""
    stored = acts_ND.detach().to("cpu", getattr(torch, manifest.dtype))
    finite_N = torch.isfinite(stored).all(dim=1)
    if not bool(finite_N.all()):
        bad = (~finite_N).nonzero()[:, 0]
        context, position = divmod(first_row + int(bad[0]), manifest.rows_per_context)
        raise NonFiniteActivationsError(
            f"{len(bad)} activation vectors of {manifest.hook} are NaN or inf as "
            f"{manifest.dtype} (first at context {context}, position "
            f"{position + manifest.first_position}); nothing of this batch was written. "
            "Check the model weights, or harvest with dtype='float32' if float16 overflowed."
        )
    return stored


def _stats_of(store: "ActivationStore") -> tuple[list[float], float, float]:
    """(mean, mean norm, mean squared norm) of every row in ``store``."""
    total, total_norm, total_sq, count = 0.0, 0.0, 0.0, 0
    for index in range(len(store.manifest.shards)):
        values = torch.from_numpy(np.array(store.shard(index)))
        shard_total, shard_norm, shard_sq = _sums_of(values)
        total, total_norm, total_sq, count = total + shard_total, total_norm + shard_norm, total_sq + shard_sq, count + len(values)
    if count == 0:
        return [], 0.0, 0.0
    return (total / count).tolist(), total_norm / count, total_sq / count


class StoreWriter:
    """Write side of a store folder: buffers rows, writes full shards atomically, resumes.

    Rows must be appended in store order (context by context). ``start_row`` tells a
    resumed harvest where this store stopped; rows before it are dropped on append.
    """

    def __init__(
        self,
        folder: str | Path,
        manifest: StoreManifest,
        contexts: np.ndarray,
        overwrite: bool = False,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if manifest.dtype not in DTYPES:
            raise StoreError(f"dtype must be one of {DTYPES}, not {manifest.dtype!r}")
        contexts = np.ascontiguousarray(contexts, dtype=np.int32)
        manifest.contexts_sha256 = hashlib.sha256(contexts.tobytes()).hexdigest()
        # one writer per store: two harvests into one folder would mix their rows
        self._lock = acquire_lock(self.folder, "store")
        try:
            self._open(manifest, contexts, overwrite)
        except BaseException:
            release_lock(self._lock)  # a refused resume must not keep others out
            raise
        self.start_row = self.manifest.n_rows
        self.next_row = self.start_row  # store row index of the next row handed to append
        self._pending: list[torch.Tensor] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._in_flight: Future | None = None
        self._pending_rows = 0
        self._sum = np.asarray(self.manifest.mean or np.zeros(manifest.d_in), dtype=np.float64) * self.start_row
        self._sum_norm = self.manifest.mean_norm * self.start_row
        self._sum_sq_norm = self.manifest.mean_sq_norm * self.start_row

    def _open(self, manifest: StoreManifest, contexts: np.ndarray, overwrite: bool) -> None:
        """Resume the store in the folder, or start it afresh (``overwrite`` or none there)."""
        existing = self.folder / MANIFEST
        remove_orphan_tmp(self.folder)  # half-written files of killed writers
        if existing.exists() and not overwrite:
            try:
                old = StoreManifest.from_json(existing.read_text())
            except (ValueError, TypeError, KeyError) as err:
                raise StoreError(f"{existing} is damaged or truncated ({type(err).__name__}: {err}), so this harvest "
                                 "cannot resume it: rerun with --overwrite (overwrite=True) to start the store afresh") from None
            self.manifest = self._resume(old, manifest)
        else:
            for stale in self.folder.glob("shard_*"):  # shards, half-written ones, ranks' shard records
                stale.unlink()
            self.manifest = manifest
            write_atomic(self.folder / CONTEXTS, _save_npy(contexts))
            self._write_manifest()

    def _resume(self, old: StoreManifest, new: StoreManifest) -> StoreManifest:
        from .models import signatures_match

        for name in ("model", "model_fingerprint", "hook", "d_in", "dtype", "shard_rows", "context_len", "first_position", "contexts_sha256"):
            if name == "model_fingerprint" and signatures_match(old.model_signature, new.model_signature):
                continue  # the same model through another TransformerLens backend
            if getattr(old, name) != getattr(new, name):
                raise StoreMismatchError(
                    f"{self.folder} holds a store with {name}={getattr(old, name)!r}, but this harvest has "
                    f"{name}={getattr(new, name)!r}; use another folder or pass overwrite=True"
                )
        # Keep the longest prefix of shards that are intact; later ones are rewritten.
        reader = ActivationStore.__new__(ActivationStore)
        reader.folder, reader.manifest, reader._verified = self.folder, old, set()
        good = 0
        for index in range(len(old.shards)):
            try:
                reader._check_size(index)
                reader._check_sha(index)
            except CorruptShardError:
                break
            good += 1
        truncated = good < len(old.shards)
        if truncated:
            dropped = old.shards[good:]
            old.shards = old.shards[:good]
            old.complete = False
            # Running statistics covered the dropped rows too; recompute them from what is kept.
            old.mean, old.mean_norm, old.mean_sq_norm = _stats_of(reader)
            for info in dropped:
                (self.folder / info.file).unlink(missing_ok=True)
        changed = (truncated or old.n_contexts != new.n_contexts or old.special_token_ids != new.special_token_ids
                   or (old.model_signature is None and new.model_signature is not None))
        old.n_contexts = new.n_contexts
        old.special_token_ids = new.special_token_ids  # stores from before the field get it
        old.model_signature = old.model_signature or new.model_signature  # likewise
        self.manifest = old
        if changed:  # a finished, intact store is only read: other processes may be reading it too
            self._write_manifest()
        return old

    @property
    def done(self) -> bool:
        return self.manifest.complete

    def seek(self, row: int) -> None:
        """Declare the store row of the next appended row (a resumed harvest starts mid-store)."""
        if self._pending_rows:
            raise StoreError("seek while rows are buffered would misplace them")
        self.next_row = row

    def wants_rows(self, n: int) -> bool:
        """Whether any of the next ``n`` rows is one this store does not hold yet."""
        return self.next_row + n > self.start_row

    def append(self, acts_ND: torch.Tensor) -> None:
        """Add the next rows in store order; writes a shard whenever ``shard_rows`` are buffered."""
        n = acts_ND.shape[0]
        if self.next_row + n > self.manifest.expected_rows:
            raise StoreError(
                f"{self.folder}: rows {self.next_row}..{self.next_row + n - 1} lie past the {self.manifest.expected_rows} "
                "rows its token windows hold; a caller appended rows twice (a resumed writer starts at start_row: "
                "seek(0) to append from the beginning)")
        skip = min(n, max(0, self.start_row - self.next_row))  # rows this store already has
        self.next_row += n
        if skip == n:
            return
        stored = _stored(acts_ND[skip:], self.manifest, self.next_row - n + skip)
        self._pending.append(stored)
        self._pending_rows += len(stored)
        while self._pending_rows >= self.manifest.shard_rows:
            self._write_shard(self.manifest.shard_rows)

    def _write_shard(self, rows: int) -> None:
        pool = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        shard, rest = pool[:rows].contiguous(), pool[rows:]
        self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)
        # Disk write, checksum and statistics overlap the next forward pass; one shard in
        # flight at a time keeps memory bounded and the manifest in shard order.
        self._wait_for_writes()
        self._in_flight = self._executor.submit(self._persist, shard)

    def _wait_for_writes(self) -> None:
        if self._in_flight is not None:
            self._in_flight.result()  # re-raises an error of the writing thread
            self._in_flight = None

    def _persist(self, shard_ND: torch.Tensor) -> None:
        index = len(self.manifest.shards)
        path = self.folder / f"shard_{index:05d}.npy"
        write_atomic(path, _save_npy(shard_ND.numpy()))
        self.manifest.shards.append(ShardInfo(path.name, len(shard_ND), sha256_file(path)))
        total, total_norm, total_sq = _sums_of(shard_ND)
        self._sum += total
        self._sum_norm += total_norm
        self._sum_sq_norm += total_sq
        written = self.manifest.n_rows
        self.manifest.mean = (self._sum / written).tolist()
        self.manifest.mean_norm = self._sum_norm / written
        self.manifest.mean_sq_norm = self._sum_sq_norm / written
        self._write_manifest()

    def abort(self) -> None:
        """Stop after an error or interrupt: let the shard being written land, drop buffered rows."""
        try:
            self._wait_for_writes()
        finally:
            self._executor.shutdown()
            self._pending, self._pending_rows = [], 0
            release_lock(self._lock)

    def close(self) -> ActivationStore:
        """Write the last, possibly short, shard; mark the store complete if every row is in."""
        if self._pending_rows:
            self._write_shard(self._pending_rows)
        self._wait_for_writes()
        self._executor.shutdown()
        complete = self.manifest.n_rows >= self.manifest.expected_rows
        if complete != self.manifest.complete or self.manifest.n_rows != self.start_row:
            self.manifest.complete = complete
            self._write_manifest()
        if complete:  # records of an unfinished several-rank harvest this one completed
            for record in self.folder.glob(f"shard_*{RECORD_SUFFIX}"):
                record.unlink()
        release_lock(self._lock)
        return ActivationStore(self.folder, verify="size")

    def _write_manifest(self) -> None:
        text = self.manifest.to_json()
        write_atomic(self.folder / MANIFEST, lambda tmp: tmp.write_text(text))


# -- several ranks, one store ---------------------------------------------------------------
RECORD_SUFFIX = ".json"
"""``shard_NNNNN.json``: a shard's record while several ranks harvest (removed on assembly)."""


def shard_file(index: int) -> str:
    return f"shard_{index:05d}.npy"


def shard_count(manifest: StoreManifest) -> int:
    return math.ceil(manifest.expected_rows / manifest.shard_rows)


def finished_shards(folder: Path, manifest: StoreManifest) -> set[int]:
    """Shards already on disk and intact: those the manifest lists (a one-process prefix,
    verified when the store was opened) and those with a record whose file matches it."""
    done = set(range(len(manifest.shards)))
    for record_path in folder.glob(f"shard_*{RECORD_SUFFIX}"):
        try:
            record = json.loads(record_path.read_text())
            index = int(record_path.stem.split("_")[1])
        except (ValueError, IndexError, OSError):
            continue  # a garbled record: its shard is written again
        path = folder / record["file"]
        if path.exists() and sha256_file(path) == record["sha256"]:
            done.add(index)
    return done


class ShardBlockWriter:
    """Writes shards ``first .. stop - 1`` of a store (a contiguous block of rows) while other
    ranks write the rest; shards in ``done`` are already on disk and are skipped.

    Rows arrive in store order as ``append(rows_ND, first_row)`` with any overlap or start
    before the block (rows outside it are dropped); ``advance(row)`` passes over rows that
    belong only to finished shards."""

    def __init__(self, folder: Path, manifest: StoreManifest, first: int, stop: int, done: set[int]):
        self.folder, self.manifest, self.done = Path(folder), manifest, set(done)
        self.lo = first * manifest.shard_rows
        self.hi = min(stop * manifest.shard_rows, manifest.expected_rows)
        self.next_row = self.lo
        self._pending: list[torch.Tensor] = []

    def _shard_of(self, row: int) -> int:
        return row // self.manifest.shard_rows

    def wants(self, row_lo: int, row_hi: int) -> bool:
        """Whether rows ``row_lo:row_hi`` hold any row of an unfinished shard of this block."""
        lo, hi = max(row_lo, self.next_row), min(row_hi, self.hi)
        return lo < hi and any(i not in self.done for i in range(self._shard_of(lo), self._shard_of(hi - 1) + 1))

    def advance(self, row: int) -> None:
        """Pass over rows up to ``row`` without data: they must all lie in finished shards."""
        row = min(row, self.hi)
        if row > self.next_row:
            if self.wants(self.next_row, row):
                raise StoreError(f"{self.folder}: rows {self.next_row}..{row - 1} were skipped but are not written yet")
            self.next_row = row

    def append(self, acts_ND: torch.Tensor, first_row: int) -> None:
        if first_row > self.next_row and self.next_row < self.hi:
            raise StoreError(f"{self.folder}: rows {self.next_row}..{first_row - 1} are missing (rows must come in order)")
        lo, hi = max(first_row, self.next_row), min(first_row + len(acts_ND), self.hi)
        while lo < hi:  # shard by shard: rows of finished shards are dropped
            index = self._shard_of(lo)
            end = min(hi, (index + 1) * self.manifest.shard_rows)
            if index not in self.done:
                self._pending.append(_stored(acts_ND[lo - first_row : end - first_row], self.manifest, lo))
            self.next_row = lo = end
            if end == min((index + 1) * self.manifest.shard_rows, self.manifest.expected_rows):
                self._close_shard(index)

    def _close_shard(self, index: int) -> None:
        if index in self.done or not self._pending:
            self._pending = []
            return
        shard_ND = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending = []
        path = self.folder / shard_file(index)
        write_atomic(path, _save_npy(shard_ND.contiguous().numpy()))
        total, total_norm, total_sq = _sums_of(shard_ND)
        record = {"file": path.name, "rows": len(shard_ND), "sha256": sha256_file(path), "sum": total.tolist(),
                  "sum_norm": total_norm, "sum_sq_norm": total_sq}
        text = json.dumps(record)  # after the shard: a record always describes a whole file
        write_atomic(path.with_suffix(RECORD_SUFFIX), lambda tmp: tmp.write_text(text))
        self.done.add(index)

    @property
    def finished(self) -> bool:
        return self.next_row >= self.hi


def assemble_store(folder: Path, manifest: StoreManifest) -> ActivationStore:
    """List every shard of a several-rank harvest in ``manifest.json``, statistics summed in
    shard order as ``StoreWriter`` sums them, mark it complete and remove the records.
    ``manifest`` is the store's current one (its listed shards are kept)."""
    folder = Path(folder)
    if manifest.complete and len(manifest.shards) == shard_count(manifest):
        return ActivationStore(folder, verify="size")  # finished before: only read, as one process would
    total = np.zeros(manifest.d_in, dtype=np.float64) * 0
    total_norm = total_sq = 0.0
    shards = []
    for index in range(shard_count(manifest)):
        if index < len(manifest.shards):  # written by one process before: sums from the file
            info = manifest.shards[index]
            sums = _sums_of(torch.from_numpy(np.array(np.load(folder / info.file, mmap_mode="r"))))
        else:
            record_path = (folder / shard_file(index)).with_suffix(RECORD_SUFFIX)
            if not record_path.exists():
                raise StoreError(f"{folder}: shard {index} was not written (a rank stopped early): rerun the same "
                                 "harvest command to finish it")
            record = json.loads(record_path.read_text())
            info = ShardInfo(record["file"], record["rows"], record["sha256"])
            sums = (np.asarray(record["sum"], dtype=np.float64), record["sum_norm"], record["sum_sq_norm"])
        shards.append(info)
        total += sums[0]
        total_norm += sums[1]
        total_sq += sums[2]
    manifest.shards = shards
    rows = manifest.n_rows
    if rows != manifest.expected_rows:
        raise StoreError(f"{folder}: the shards hold {rows} rows, not the {manifest.expected_rows} the contexts give: "
                         "harvest it again with --overwrite")
    manifest.mean = (total / rows).tolist()
    manifest.mean_norm = total_norm / rows
    manifest.mean_sq_norm = total_sq / rows
    manifest.complete = True
    text = manifest.to_json()
    write_atomic(folder / MANIFEST, lambda tmp: tmp.write_text(text))
    for record in folder.glob(f"shard_*{RECORD_SUFFIX}"):
        record.unlink()
    return ActivationStore(folder, verify="size")
