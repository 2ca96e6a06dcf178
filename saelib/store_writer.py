"""Write side of an activation store (format and reader: ``saelib.store``): rows appended in
store order, full shards written atomically by a background thread while the next forward
pass runs, running statistics kept in the manifest, and resume after a kill."""

from __future__ import annotations

import hashlib
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
            for stale in self.folder.glob("shard_*.npy*"):
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
        stored = acts_ND[skip:].detach().to("cpu", getattr(torch, self.manifest.dtype))
        # Checked after the cast, so values that overflow float16 are caught too.
        finite_N = torch.isfinite(stored).all(dim=1)
        if not bool(finite_N.all()):
            bad = (~finite_N).nonzero()[:, 0]
            context, position = divmod(self.next_row - n + skip + int(bad[0]), self.manifest.rows_per_context)
            raise NonFiniteActivationsError(
                f"{len(bad)} activation vectors of {self.manifest.hook} are NaN or inf as "
                f"{self.manifest.dtype} (first at context {context}, position "
                f"{position + self.manifest.first_position}); nothing of this batch was written. "
                "Check the model weights, or harvest with dtype='float32' if float16 overflowed."
            )
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
        release_lock(self._lock)
        return ActivationStore(self.folder, verify="size")

    def _write_manifest(self) -> None:
        text = self.manifest.to_json()
        write_atomic(self.folder / MANIFEST, lambda tmp: tmp.write_text(text))
