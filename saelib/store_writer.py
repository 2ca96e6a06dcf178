"""Write side of an activation store (format and reader: ``saelib.store``): rows appended in
store order, cast and checked once into a shard image in memory that is hashed as it fills,
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


# Rows are copied into a shard image and hashed in pieces of about this size: hashing each
# while it is still in the core's cache took 42 ms per 64 MiB against 59-72 ms for pieces of
# 8 MiB (a whole harvest batch) on issue 20's Xeon.
_HASH_BYTES = 1 << 20


class ShardImage:
    """A shard's ``.npy`` file built in page-aligned memory: numpy's header, then the rows,
    hashed as they are copied in (while they are still in the cache) and saved with one
    unbuffered write, so nothing is copied into the page cache or read back. A writer makes
    two and fills them in turn, shard after shard.

        image.start(rows); image.add(rows_ND) ...; sha256 = image.seal(); image.save(path)
    """

    def __init__(self, capacity: int, d_in: int, dtype: str):
        import mmap

        self.d_in, self.dtype, self.row_bytes = d_in, dtype, d_in * np.dtype(dtype).itemsize
        self.header_bytes = len(npy_header(capacity, d_in, dtype))
        self.memory = _take_memory(-(-(self.header_bytes + capacity * self.row_bytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
        self.rows_ND = torch.frombuffer(self.memory, dtype=getattr(torch, dtype), count=capacity * d_in,
                                        offset=self.header_bytes).view(capacity, d_in)
        self.planned = self.filled = 0

    def start(self, rows: int) -> None:
        """Begin a shard that will hold ``rows`` rows (at most the capacity)."""
        header = npy_header(rows, self.d_in, self.dtype)
        # numpy pads a header to a multiple of 64 bytes: 128 for any 2-D shape of up to ~40 digits
        assert len(header) == self.header_bytes, f"npy header of {len(header)} bytes for {rows} rows"
        self.memory[: len(header)] = header
        self._digest = hashlib.sha256(header)
        self.planned, self.filled = rows, 0

    def add(self, rows_ND: torch.Tensor) -> int:
        """Copy as many of ``rows_ND`` [N, d_in] as the shard has room for; returns how many."""
        take = min(len(rows_ND), self.planned - self.filled)
        memory = memoryview(self.memory)
        step = max(1, _HASH_BYTES // self.row_bytes)
        for lo in range(0, take, step):  # hashed right after the copy, while in the L2 cache
            hi = min(take, lo + step)
            self.rows_ND[self.filled + lo : self.filled + hi].copy_(rows_ND[lo:hi])
            start = self.header_bytes + (self.filled + lo) * self.row_bytes
            self._digest.update(memory[start : start + (hi - lo) * self.row_bytes])
        self.filled += take
        return take

    @property
    def full(self) -> bool:
        return self.filled == self.planned

    def seal(self) -> str:
        """The sha256 of the file the rows added so far make."""
        if self.filled != self.planned:  # closed early: the header for fewer rows, then all rows hashed afresh
            rows = self.filled
            self.start(rows)
            self.filled = rows
            self._digest.update(memoryview(self.memory)[self.header_bytes : self._size()])
        return self._digest.hexdigest()

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


# Rows are checked and summed in float32 blocks of about this many bytes: small enough to
# stay in a core's L2 cache, so a float16 shard is read from memory once instead of being
# widened into a float32 copy of twice its size first.
_BLOCK_BYTES = 4 << 20


def _float32_blocks(rows_ND: torch.Tensor):
    """Consecutive blocks of ``rows_ND`` as float32 [<=block, d]: views of a float32 tensor,
    else copies into one reused buffer (valid until the next block is taken)."""
    n, d = rows_ND.shape
    block = max(1, _BLOCK_BYTES // (4 * max(1, d)))
    if rows_ND.dtype == torch.float32:
        for lo in range(0, n, block):
            yield rows_ND[lo : lo + block]
        return
    buffer = torch.empty(min(block, n), d)
    for lo in range(0, n, block):
        piece = rows_ND[lo : lo + block]
        out = buffer[: len(piece)]
        out.copy_(piece)
        yield out


def _row_norms(rows_ND: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row [N], summed in float32 (no rescaling, so a row that holds a NaN or
    inf, or whose squares overflow float32, gets a non-finite norm)."""
    if len(rows_ND) == 0:
        return torch.zeros(0)
    return torch.cat([torch.linalg.vector_norm(block, dim=1) for block in _float32_blocks(rows_ND)])


def _sums_of(rows_ND: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """(sum of rows [d_in] float64, sum of norms, sum of squared norms) of one shard. Every
    statistic of a store comes from here, block by block in one fixed order, so one writer,
    several ranks and a resumed store sum a shard to the same bits."""
    total_D = torch.zeros(rows_ND.shape[1], dtype=torch.float64)
    norms = []
    for block in _float32_blocks(rows_ND):
        total_D += (torch.ones(1, len(block)) @ block)[0]  # a matmul: far faster than sum(dim=0)
        norms.append(torch.linalg.vector_norm(block, dim=1))
    norms_N = torch.cat(norms).double() if norms else torch.zeros(0, dtype=torch.float64)
    return total_D.numpy(), float(norms_N.sum()), float(norms_N.square().sum())


def _check_finite(stored_ND: torch.Tensor, manifest: StoreManifest, first_row: int) -> None:
    """Refuse rows (already in the store's dtype) with their context and position if any
    value is NaN or inf; checked after the cast, so values that overflow float16 are caught."""
    finite_N = torch.isfinite(_row_norms(stored_ND))
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


def _stored(acts_ND: torch.Tensor, manifest: StoreManifest, first_row: int) -> torch.Tensor:
    """Rows cast to the store's dtype on the CPU (a new tensor), checked by ``_check_finite``."""
    stored = acts_ND.detach().to("cpu", getattr(torch, manifest.dtype))
    _check_finite(stored, manifest, first_row)
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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._in_flight: Future | None = None
        self._images: list[ShardImage | None] = [None, None]  # shard images, used in turn
        self._shards_handed = 0
        self._filling: ShardImage | None = None  # the shard being filled
        self._shard_start = self.start_row  # store row of the first row of the shard being filled
        self._scratch: torch.Tensor | None = None  # cast rows of the last append
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
        along the leading axes in order (a strided view is fine: the cast to the store's dtype
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
        self.next_row += n
        if skip == n:
            return
        if skip:  # a resumed store further ahead than the others: rare, a copy is fine
            acts = acts.reshape(n, -1)[skip:]
        stored_ND = self._cast(acts, n - skip)
        _check_finite(stored_ND, self.manifest, self.next_row - n + skip)
        self._place(stored_ND)

    def _cast(self, acts: torch.Tensor, n: int) -> torch.Tensor:
        """``acts`` as [n, d_in] rows in the store's dtype on the CPU, in a scratch buffer that
        the next call reuses (no fresh allocation per batch)."""
        dtype = getattr(torch, self.manifest.dtype)
        if acts.ndim == 2 and acts.dtype == dtype and acts.device.type == "cpu":
            return acts.detach()  # already rows of the store's dtype: _place makes the copy
        if self._scratch is None or len(self._scratch) < n:
            self._scratch = torch.empty(n, self.manifest.d_in, dtype=dtype)
        stored_ND = self._scratch[:n]
        stored_ND.view(acts.shape).copy_(acts.detach())
        return stored_ND

    def _place(self, stored_ND: torch.Tensor) -> None:
        """Copy checked rows into the shard being filled; hand each full shard to the writer thread."""
        at = 0
        while at < len(stored_ND):
            if self._filling is None:
                self._filling = self._next_image()
            at += self._filling.add(stored_ND[at:])
            if self._filling.full:
                self._write_shard()

    def _next_image(self) -> ShardImage:
        """The image for the next shard, started. Shards alternate between two images: when a
        shard is handed over, the write of the one before it has finished (``_write_shard``
        waits), so its image is free."""
        rows = min(self.manifest.shard_rows, self.manifest.expected_rows - self._shard_start)
        slot = self._shards_handed % 2
        if self._images[slot] is None:  # rows only shrink from shard to shard: the first size serves
            self._images[slot] = ShardImage(rows, self.manifest.d_in, self.manifest.dtype)
        self._images[slot].start(rows)
        return self._images[slot]

    def _write_shard(self) -> None:
        image = self._filling
        # Checksum (as rows arrive) and statistics here, between forward passes: run beside
        # them in the writer thread, they cost the forward pass twice their own time, as its
        # OpenMP threads wait at every op for the one that shares a core with the writer. The
        # disk write, mostly waiting, overlaps the next forward pass; one shard in flight at
        # a time keeps memory bounded and the manifest in shard order.
        sha256 = image.seal()
        sums = _sums_of(image.rows_ND[: image.filled])
        self._wait_for_writes()
        self._in_flight = self._executor.submit(self._persist, image, sha256, sums)
        self._shards_handed += 1
        self._shard_start += image.filled
        self._filling = None

    def _wait_for_writes(self) -> None:
        if self._in_flight is not None:
            self._in_flight.result()  # re-raises an error of the writing thread
            self._in_flight = None

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
            self._write_shard()
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
        images, self._images = self._images, [None, None]
        for image in images:
            if image is not None:
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
        image = ShardImage(len(shard_ND), self.manifest.d_in, self.manifest.dtype)  # the one way shards are written
        image.start(len(shard_ND))
        image.add(shard_ND)
        sha256 = image.seal()
        image.save(path)
        image.release()
        total, total_norm, total_sq = _sums_of(shard_ND)
        record = {"file": path.name, "rows": len(shard_ND), "sha256": sha256, "sum": total.tolist(),
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
