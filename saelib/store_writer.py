"""Write side of an activation store (format and reader: ``saelib.store``): rows appended in
store order, cast once into a shard image in memory that is checked, hashed and summed as it fills,
full shards written atomically and past the page cache by a background thread while the
next forward pass runs, running statistics kept in the manifest, and resume after a kill.

Several ranks harvesting one store at once (``torchrun ... harvest``) each write a block of
its shards with ``ShardBlockWriter``: every shard lands as ``shard_NNNNN.npy`` plus a small
record ``shard_NNNNN.json`` (rows, sha256, sums). ``assemble_store`` then lists them all in
the manifest, statistics summed in shard order as one writer would, and removes the
records: the finished folder is the one a single process writes."""

from __future__ import annotations

import hashlib
import json
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .files import acquire_lock, release_lock, remove_orphan_tmp, sha256_file, write_atomic, write_unbuffered
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
    npy_header,
)


def _save_npy(array: np.ndarray):
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    return write


# Shard images' memory, kept for the next writer of this process when a writer closes, up to
# this many bytes. Fresh memory is slow to touch the first time on a virtual machine (issue
# 20's Xeon: 37 ms per 64 MiB image, 0.22 s for the six images of a three-hook harvest,
# against about 9 ms for memory the process touched before), and notebooks harvest again
# and again in one process (several layers, several models).
_SPARE_LIMIT = 512 << 20
_spare_memory: list = []  # mmap objects no image uses, oldest first
_spare_lock = threading.Lock()
mapped_bytes = 0
"""Bytes of image memory this process has mapped so far (reused memory not counted again)."""


def _take_memory(size: int):
    """Page-aligned, already mapped memory of at least ``size`` bytes: a spare, or fresh."""
    global mapped_bytes
    import mmap

    with _spare_lock:
        fits = [memory for memory in _spare_memory if len(memory) >= size]
        if fits:
            memory = min(fits, key=len)
            _spare_memory.remove(memory)
            return memory
        mapped_bytes += size
    if hasattr(mmap, "MAP_POPULATE"):  # every page mapped in one call, not faulted in one by one
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return mmap.mmap(-1, size)


def _give_back(memory) -> None:
    """Keep ``memory`` for a later image, dropping the oldest spares beyond ``_SPARE_LIMIT``."""
    with _spare_lock:
        _spare_memory.append(memory)
        while sum(len(m) for m in _spare_memory) > _SPARE_LIMIT:
            _spare_memory.pop(0).close()


# Rows are copied into a shard image once, then checked, hashed and summed in pieces of about
# this many bytes of the store's dtype, counted from the shard's first row: each piece is
# read while it is still in the core's L2 cache (hashing 1 MiB pieces so took 42 ms per
# 64 MiB against 59-72 ms for 8 MiB ones on issue 20's Xeon), and the statistics, summed
# piece by piece in this one fixed grid, come out the same to the bit whether one writer,
# several ranks or a resumed store sums a shard (``_sums_of``).
_PIECE_BYTES = 1 << 20


def _piece_rows(row_bytes: int) -> int:
    """Rows per piece of the grid (``_PIECE_BYTES``) for rows of ``row_bytes`` bytes."""
    return max(1, _PIECE_BYTES // max(1, row_bytes))


def _as_float32(rows_ND: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
    """``rows_ND`` as float32: itself if it is, else a copy into ``buffer`` (at least as many
    rows; valid until the buffer is reused)."""
    if rows_ND.dtype == torch.float32:
        return rows_ND
    widened = buffer[: len(rows_ND)]
    widened.copy_(rows_ND)
    return widened


def _row_norms(rows_ND: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """L2 norm of each float32 row [N], summed in float32 without rescaling, so a row holding
    a NaN or inf, or one whose squares overflow float32, gets a non-finite norm. A row's norm
    depends on that row alone, not on the rows computed with it."""
    return torch.linalg.vector_norm(rows_ND, dim=1, out=out)


def _column_sum(rows_ND: torch.Tensor) -> torch.Tensor:
    """Sum of the float32 rows [d] as float64: a matmul, far faster than ``sum(dim=0)``."""
    return (torch.ones(1, len(rows_ND)) @ rows_ND)[0].double()


def _sums_of(rows_ND: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """(sum of rows [d_in] float64, sum of norms, sum of squared norms) of one shard's rows,
    in the store's dtype: summed piece by piece on the grid ``ShardImage`` sums on, so this
    gives the same bits as the image that wrote the shard."""
    n, d = rows_ND.shape
    step = _piece_rows(d * rows_ND.element_size())
    buffer = None if rows_ND.dtype == torch.float32 else torch.empty(min(step, n), d)
    total_D = torch.zeros(d, dtype=torch.float64)
    norms_N = torch.empty(n)
    for lo in range(0, n, step):
        piece = _as_float32(rows_ND[lo : lo + step], buffer)
        total_D += _column_sum(piece)
        _row_norms(piece, out=norms_N[lo : lo + len(piece)])
    return _totals(total_D, norms_N)


def _totals(total_D: torch.Tensor, norms_N: torch.Tensor) -> tuple[np.ndarray, float, float]:
    norms_N = norms_N.double()
    return total_D.numpy().copy(), float(norms_N.sum()), float(norms_N.square().sum())


def _copy_rows(dst_ND: torch.Tensor, source_BRD: torch.Tensor, lo: int, hi: int) -> None:
    """Copy (and cast) rows ``lo:hi`` of ``source_BRD`` [B, R, d], whose rows run along its
    first two axes (a strided view is fine), into ``dst_ND`` [hi - lo, d]: whole contexts in one
    copy, a part of one at either end separately."""
    per = source_BRD.shape[1]
    at = 0
    while lo < hi:
        b, r = divmod(lo, per)
        if r == 0 and hi - lo >= per:
            whole = (hi - lo) // per
            dst_ND[at : at + whole * per].view(whole, per, -1).copy_(source_BRD[b : b + whole])
            step = whole * per
        else:
            step = min(hi - lo, per - r)
            dst_ND[at : at + step].copy_(source_BRD[b, r : r + step])
        at, lo = at + step, lo + step


class NonFiniteRow(Exception):
    """A row cast into an image is NaN or inf (or its norm overflows float32); ``row``: its
    index in the source handed to ``ShardImage.add``. The writer turns it into the store's
    ``NonFiniteActivationsError``."""

    def __init__(self, row: int):
        super().__init__(row)
        self.row = row


class ShardImage:
    """A shard's ``.npy`` file built in page-aligned memory: numpy's header, then the rows.
    Rows are cast into it once; each piece of the grid (``_PIECE_BYTES``) is then checked for
    NaN and inf, hashed and summed while it is still in the cache, and the shard is saved with
    one unbuffered write, so nothing is copied into the page cache or read back. A writer
    fills images in turn, shard after shard.

        image.start(rows); image.add(rows_ND) ...; sha256 = image.seal(); sums = image.sums(); image.save(path)

    ``mark()`` and ``restore(mark)`` undo the rows added in between (a bad row later in a batch)."""

    def __init__(self, capacity: int, d_in: int, dtype: str):
        import mmap

        self.d_in, self.dtype, self.row_bytes = d_in, dtype, d_in * np.dtype(dtype).itemsize
        self.header_bytes = len(npy_header(capacity, d_in, dtype))
        self.memory = _take_memory(-(-(self.header_bytes + capacity * self.row_bytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
        self.rows_ND = torch.frombuffer(self.memory, dtype=getattr(torch, dtype), count=capacity * d_in,
                                        offset=self.header_bytes).view(capacity, d_in)
        self.norms_N = torch.empty(capacity)  # float32 norm of each row added
        self.piece_rows = _piece_rows(self.row_bytes)
        self._widened = None if dtype == "float32" else torch.empty(min(self.piece_rows, capacity), d_in)
        self.planned = self.filled = 0

    def start(self, rows: int) -> None:
        """Begin a shard that will hold ``rows`` rows (at most the capacity)."""
        header = npy_header(rows, self.d_in, self.dtype)
        # numpy pads a header to a multiple of 64 bytes: 128 for any 2-D shape of up to ~40 digits
        assert len(header) == self.header_bytes, f"npy header of {len(header)} bytes for {rows} rows"
        self.memory[: len(header)] = header
        self._digest = hashlib.sha256(header)
        self._total_D = torch.zeros(self.d_in, dtype=torch.float64)
        self.planned, self.filled = rows, 0

    def mark(self):
        """The state to go back to with ``restore``."""
        return self.filled, self._digest.copy(), self._total_D.clone()

    def restore(self, mark) -> None:
        self.filled, self._digest, self._total_D = mark[0], mark[1].copy(), mark[2].clone()

    def add(self, source: torch.Tensor, start: int = 0) -> int:
        """Copy rows ``start:`` of ``source`` ([N, d_in], or [B, R, d_in] with rows along its
        first two axes) into the shard, as many as it has room for, cast to its dtype; returns
        how many. Raises ``NonFiniteRow`` for the first bad row, leaving ``filled`` as it was;
        pieces before it may have been hashed and summed (``mark``/``restore`` undo that)."""
        source_BRD = source.unsqueeze(0) if source.ndim == 2 else source
        rows = source_BRD.shape[0] * source_BRD.shape[1]
        take = min(rows - start, self.planned - self.filled)
        lo, hi = self.filled, self.filled + take
        _copy_rows(self.rows_ND[lo:hi], source_BRD.detach(), start, start + take)
        memory = memoryview(self.memory)
        step = self.piece_rows
        while lo < hi:
            piece_lo = lo // step * step
            piece_hi = min(piece_lo + step, self.planned)
            end = min(hi, piece_hi)
            widened = _as_float32(self.rows_ND[lo:end], self._widened)
            norms = _row_norms(widened, out=self.norms_N[lo:end])
            if not bool(torch.isfinite(norms).all()):
                bad = int((~torch.isfinite(norms)).nonzero()[0, 0])
                raise NonFiniteRow(start + lo - self.filled + bad)
            at = self.header_bytes + lo * self.row_bytes
            self._digest.update(memory[at : at + (end - lo) * self.row_bytes])
            if end == piece_hi:  # the piece is whole: its sum, on the grid _sums_of uses
                if lo != piece_lo:  # its first rows came in an earlier call
                    widened = _as_float32(self.rows_ND[piece_lo:end], self._widened)
                self._total_D += _column_sum(widened)
            lo = end
        self.filled = hi
        return take

    @property
    def full(self) -> bool:
        return self.filled == self.planned

    def seal(self) -> str:
        """The sha256 of the file the rows added so far make."""
        if self.filled != self.planned:  # closed early: the header for fewer rows, then all rows hashed afresh
            rows, total_D = self.filled, self._total_D
            self.start(rows)
            self.filled, self._total_D = rows, total_D
            self._digest.update(memoryview(self.memory)[self.header_bytes : self._size()])
            piece_lo = rows // self.piece_rows * self.piece_rows
            if piece_lo < rows:  # the last piece, cut short, was never whole: summed now
                self._total_D += _column_sum(_as_float32(self.rows_ND[piece_lo:rows], self._widened))
        return self._digest.hexdigest()

    def sums(self) -> tuple[np.ndarray, float, float]:
        """The sealed shard's statistics, as ``_sums_of`` gives them for its rows."""
        return _totals(self._total_D, self.norms_N[: self.filled])

    def save(self, path: Path) -> None:
        """Write the sealed shard as the ``.npy`` file ``path`` (atomically)."""
        write_atomic(path, lambda tmp: write_unbuffered(tmp, self.memory, self._size()))

    def _size(self) -> int:
        return self.header_bytes + self.filled * self.row_bytes

    def release(self) -> None:
        """Hand the memory back for later images of this process; the image is unusable after."""
        memory, self.memory = self.memory, None
        del self.rows_ND  # the view holds the buffer: gone, so a spare beyond the limit can be closed
        _give_back(memory)


def _check_finite(stored_ND: torch.Tensor, manifest: StoreManifest, first_row: int) -> None:
    """Refuse rows (already in the store's dtype) with their context and position if any
    value is NaN or inf; checked after the cast, so values that overflow float16 are caught."""
    finite_N = torch.isfinite(_row_norms(stored_ND.float()))
    if not bool(finite_N.all()):
        bad = (~finite_N).nonzero()[:, 0]
        if bool(torch.isfinite(stored_ND[bad]).all()):  # finite values whose squares overflow float32
            what = "too large for float32 statistics (a norm above 3e38)"
        else:
            what = "NaN or inf"
        context, position = divmod(first_row + int(bad[0]), manifest.rows_per_context)
        raise NonFiniteActivationsError(
            f"{len(bad)} activation vectors of {manifest.hook} are {what} as "
            f"{manifest.dtype} (first at context {context}, position "
            f"{position + manifest.first_position}); nothing of this batch was written. "
            "Check the model weights, or harvest with dtype='float32' if float16 overflowed."
        )


def _in_dtype(source: torch.Tensor, dtype: str) -> torch.Tensor:
    """``source``'s rows as [N, d] in ``dtype`` on the CPU (a copy)."""
    return source.detach().to("cpu", getattr(torch, dtype)).reshape(-1, source.shape[-1])


def _refuse(source: torch.Tensor, start: int, manifest: StoreManifest, first_row: int, folder: Path):
    """Raise the ``NonFiniteActivationsError`` for rows ``start:`` of ``source`` (store rows from
    ``first_row``), once ``ShardImage.add`` met a bad row among them: ``_check_finite`` counts
    every bad row of the call and names the first."""
    _check_finite(_in_dtype(source, manifest.dtype)[start:], manifest, first_row)
    raise StoreError(f"{folder}: a row was refused as non-finite, yet its values are finite; please report this")


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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._in_flight: tuple[Future, ShardImage] | None = None  # the shard being written
        self._images: list[ShardImage] = []  # every image this writer made
        self._free: list[ShardImage] = []  # images no shard uses
        self._filling: ShardImage | None = None  # the shard being filled
        self._shard_start = self.start_row  # store row of the first row of the shard being filled
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
        if self._filling is not None and self._filling.filled:
            raise StoreError("seek while rows are buffered would misplace them")
        self.next_row = row

    def wants_rows(self, n: int) -> bool:
        """Whether any of the next ``n`` rows is one this store does not hold yet."""
        return self.next_row + n > self.start_row

    def append(self, acts: torch.Tensor) -> None:
        """Add the next rows in store order: ``acts`` is [N, d_in], or [..., d_in] with rows
        along the leading axes in order (a strided view is fine: the cast into the shard image
        is the one copy). Writes a shard whenever one fills. If any row is NaN or inf, raises
        ``NonFiniteActivationsError`` before any row of this call is buffered or written."""
        n = acts.shape[:-1].numel() if acts.ndim > 1 else 0
        if acts.ndim < 2 or acts.shape[-1] != self.manifest.d_in:
            raise StoreError(f"{self.folder}: rows of {self.manifest.d_in} values expected, got shape {tuple(acts.shape)}")
        if self.next_row + n > self.manifest.expected_rows:
            raise StoreError(
                f"{self.folder}: rows {self.next_row}..{self.next_row + n - 1} lie past the {self.manifest.expected_rows} "
                "rows its token windows hold; a caller appended rows twice (a resumed writer starts at start_row: "
                "seek(0) to append from the beginning)")
        skip = min(n, max(0, self.start_row - self.next_row))  # rows this store already has
        first_row = self.next_row + skip
        if skip == n:
            self.next_row += n
            return
        if acts.ndim > 3:  # rows along more than two axes: as [B, R, d_in] (a copy only if it must)
            acts = acts.reshape(acts.shape[0], -1, acts.shape[-1])
        try:
            self._place(acts, skip)
        except NonFiniteRow:
            _refuse(acts, skip, self.manifest, first_row, self.folder)
        self.next_row += n

    def _place(self, acts: torch.Tensor, at: int) -> None:
        """Cast rows ``at:`` of ``acts`` into the shard being filled, and the next shards if they
        fill; hand each full shard to the writer thread once every row of the call is checked
        (a bad row puts every image back as it was before the call, and nothing is handed)."""
        rows = acts.shape[0] * acts.shape[1] if acts.ndim == 3 else acts.shape[0]
        first = self._filling
        mark = first.mark() if first is not None else None
        full: list[ShardImage] = []
        try:
            while at < rows:
                if self._filling is None:
                    self._filling = self._next_image(full)
                at += self._filling.add(acts, at)
                if self._filling.full:
                    full.append(self._filling)
                    self._filling = None
        except NonFiniteRow:
            for image in full + [self._filling]:
                if image is not None and image is not first:
                    self._free.append(image)
            if first is not None:
                first.restore(mark)
            self._filling = first
            raise
        for image in full:
            self._write_shard(image)

    def _next_image(self, waiting: list[ShardImage]) -> ShardImage:
        """An image for the next shard, started; ``waiting``: full shards of this call not yet
        handed to the writer thread. An image is free again once its shard is on disk. Two
        serve in turn (one filled while the other is written); more only while one call fills
        several shards."""
        start = self._shard_start + sum(image.filled for image in waiting)
        rows = min(self.manifest.shard_rows, self.manifest.expected_rows - start)
        if not self._free and self._in_flight is not None and len(self._images) >= 2 + len(waiting):
            self._wait_for_writes()
        if self._free:
            image = self._free.pop()
        else:  # rows only shrink from shard to shard: the first size serves every later shard
            image = ShardImage(rows, self.manifest.d_in, self.manifest.dtype)
            self._images.append(image)
        image.start(rows)
        return image

    def _write_shard(self, image: ShardImage) -> None:
        # Checksum and statistics (as rows arrive) and sealing here, between forward passes: run
        # beside them in the writer thread, they cost the forward pass twice their own time, as
        # its OpenMP threads wait at every op for the one that shares a core with the writer.
        # The disk write, mostly waiting, overlaps the next forward pass; one shard in flight at
        # a time keeps memory bounded and the manifest in shard order.
        sha256 = image.seal()
        sums = image.sums()
        self._wait_for_writes()
        self._in_flight = (self._executor.submit(self._persist, image, sha256, sums), image)
        self._shard_start += image.filled

    def _wait_for_writes(self) -> None:
        if self._in_flight is not None:
            future, image = self._in_flight
            self._in_flight = None
            future.result()  # re-raises an error of the writing thread
            self._free.append(image)

    def _persist(self, image: ShardImage, sha256: str, sums) -> None:
        index = len(self.manifest.shards)
        path = self.folder / shard_file(index)
        image.save(path)
        self.manifest.shards.append(ShardInfo(path.name, image.filled, sha256))
        total, total_norm, total_sq = sums
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
            self._filling = None
            self._release_images()
            release_lock(self._lock)

    def close(self) -> ActivationStore:
        """Write the last, possibly short, shard; mark the store complete if every row is in."""
        if self._filling is not None and self._filling.filled:
            self._write_shard(self._filling)
        self._filling = None
        self._wait_for_writes()
        self._executor.shutdown()
        self._release_images()
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

    def _release_images(self) -> None:
        """Hand the shard images' memory on (``_give_back``); only once no write uses them."""
        images, self._images, self._free = self._images, [], []
        for image in images:
            image.release()


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
        self._image: ShardImage | None = None  # the shard being filled

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

    def append(self, acts: torch.Tensor, first_row: int) -> None:
        """Rows from store row ``first_row`` on: ``acts`` is [N, d_in], or [B, R, d_in] with
        rows along its first two axes (a strided view is fine)."""
        if first_row > self.next_row and self.next_row < self.hi:
            raise StoreError(f"{self.folder}: rows {self.next_row}..{first_row - 1} are missing (rows must come in order)")
        rows = acts.shape[0] * acts.shape[1] if acts.ndim == 3 else len(acts)
        lo, hi = max(first_row, self.next_row), min(first_row + rows, self.hi)
        while lo < hi:  # shard by shard: rows of finished shards are dropped
            index = self._shard_of(lo)
            shard_lo = index * self.manifest.shard_rows
            shard_hi = min(shard_lo + self.manifest.shard_rows, self.manifest.expected_rows)
            end = min(hi, shard_hi)
            if index not in self.done:
                if self._image is None:
                    self._image = ShardImage(shard_hi - shard_lo, self.manifest.d_in, self.manifest.dtype)
                    self._image.start(shard_hi - shard_lo)
                try:
                    self._image.add(acts, lo - first_row)
                except NonFiniteRow:
                    _refuse(acts, lo - first_row, self.manifest, lo, self.folder)
            self.next_row = lo = end
            if end == shard_hi:
                self._close_shard(index)

    def _close_shard(self, index: int) -> None:
        image, self._image = self._image, None
        if image is None:
            return
        if index not in self.done:
            path = self.folder / shard_file(index)
            sha256 = image.seal()
            image.save(path)
            total, total_norm, total_sq = image.sums()
            record = {"file": path.name, "rows": image.filled, "sha256": sha256, "sum": total.tolist(),
                      "sum_norm": total_norm, "sum_sq_norm": total_sq}
            text = json.dumps(record)  # after the shard: a record always describes a whole file
            write_atomic(path.with_suffix(RECORD_SUFFIX), lambda tmp: tmp.write_text(text))
            self.done.add(index)
        image.release()

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
