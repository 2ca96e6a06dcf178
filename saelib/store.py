"""The on-disk activation store: one folder per (model, hook), fixed-size shards.

Layout of a store folder::

    manifest.json       model, fingerprint, hook, d_in, dtype, shards (rows, sha256), stats
    contexts.npy        [n_contexts, context_len] int32 token windows the rows came from
    shard_00000.npy     [shard_rows, d_in] float16/float32 activation vectors
    ...

Row ``r`` of the store is position ``first_position + r % rows_per_context`` of
context ``r // rows_per_context`` (rows are written in context order), so dashboards can
show any activation in its text without extra index files.

This module holds the format (``StoreManifest``) and the reader (``ActivationStore``);
``saelib.store_writer`` the writer. Every shard is written to a temporary file and renamed,
and only then listed in the manifest (itself replaced atomically). A reader accepts only
listed shards whose size and sha256 match, so a killed harvest never leaves a half shard
that is read as data.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .files import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONTEXTS = "contexts.npy"
DTYPES = ("float16", "float32")


class StoreError(ValueError):
    """A store cannot be used as asked; the message says why and what to do."""


class CorruptShardError(StoreError):
    """A shard is truncated, altered or missing (its size or sha256 disagrees with the manifest)."""


class StoreMismatchError(StoreError):
    """A store does not fit what it is used with (another model, hook or d_in)."""


class NonFiniteActivationsError(StoreError):
    """NaN or infinite activations were about to be written."""


@dataclass
class ShardInfo:
    file: str
    """File name inside the store folder."""
    rows: int
    """Activation vectors in this shard."""
    sha256: str
    """Checksum of the whole ``.npy`` file."""


@dataclass
class StoreManifest:
    """What ``manifest.json`` holds; fields are read back with the same names."""

    model: str
    """Model name as given to ``load_model`` (``"embedded"``, ``"pythia-70m-deduped"``...)."""
    model_fingerprint: str
    """Hash of the model's weights (``saelib.models.model_fingerprint``): tells apart a
    trained model from its random-weight control even under the same name."""
    hook: str
    """TransformerLens hook name, e.g. ``blocks.2.hook_resid_post``."""
    d_in: int
    """Length of each activation vector (hooks with head axes are flattened)."""
    dtype: str
    """``float16`` or ``float32`` on disk; readers always return float32."""
    shard_rows: int
    """Rows per shard; only the last shard may hold fewer."""
    context_len: int
    """Tokens per context window (BOS included)."""
    n_contexts: int
    """Context windows the harvest will cover when complete."""
    first_position: int
    """1 when the BOS position is skipped, else 0."""
    contexts_sha256: str
    """Checksum of ``contexts.npy``; a resumed harvest must use the same tokens."""
    special_token_ids: list[int] = field(default_factory=list)
    """The model's special tokens (``<|endoftext|>``...). Their rows are stored like any
    other; readers leave them out when asked (``skip_special``), as training and
    evaluation do by default."""
    shards: list[ShardInfo] = field(default_factory=list)
    """Shards written so far, in row order."""
    complete: bool = False
    """True once every context has been harvested."""
    mean: list[float] = field(default_factory=list)
    """Running per-dimension mean of the rows written so far: [d_in]."""
    mean_norm: float = 0.0
    """Running mean L2 norm of the rows written so far."""
    mean_sq_norm: float = 0.0
    """Running mean squared L2 norm (for fraction-of-variance computations)."""
    format_version: int = FORMAT_VERSION
    model_signature: list[float] | None = None
    """``saelib.models.model_signature``: what the model computes on a fixed probe, so the
    same model loaded through another TransformerLens backend (whose weights hash
    differently) is still recognised. Absent in stores written before it existed."""

    def statistics_problem(self) -> str | None:
        """What is wrong with the running statistics (None: consistent). A mean of the right
        length, finite norms, and E|x|^2 >= (E|x|)^2, which every real set of rows meets."""
        if not self.shards:
            return None
        if len(self.mean) != self.d_in:
            return f"mean has {len(self.mean)} values for d_in {self.d_in}"
        if not np.isfinite(np.asarray(self.mean, dtype=np.float64)).all():
            return "mean holds NaN or inf"
        norm, sq = self.mean_norm, self.mean_sq_norm
        if not (np.isfinite(norm) and np.isfinite(sq) and norm >= 0 and sq >= 0):
            return f"mean_norm={norm}, mean_sq_norm={sq}: not finite and non-negative"
        if sq < norm * norm * (1 - 1e-3):
            return f"mean_sq_norm={sq} is less than mean_norm^2={norm * norm}, impossible for real rows"
        return None

    @property
    def rows_per_context(self) -> int:
        return self.context_len - self.first_position

    @property
    def n_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def expected_rows(self) -> int:
        return self.n_contexts * self.rows_per_context

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "StoreManifest":
        values = json.loads(text)
        values["shards"] = [ShardInfo(**s) for s in values.get("shards", [])]
        return cls(**values)


def npy_header(rows: int, d_in: int, dtype: str) -> bytes:
    """The header ``np.save`` writes before a C-ordered [rows, d_in] array (format 1.0)."""
    header = np.lib.format.header_data_from_array_1_0(np.empty((0, d_in), dtype=dtype))
    header["shape"] = (rows, d_in)
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _npy_bytes(rows: int, d_in: int, dtype: str) -> int:
    """Exact size of an ``.npy`` file holding a C-ordered [rows, d_in] array."""
    return len(npy_header(rows, d_in, dtype)) + rows * d_in * np.dtype(dtype).itemsize


class ActivationStore:
    """Read side of a store folder: memory-mapped shards, checked before use.

    ``verify``: ``"lazy"`` (default) checks each shard's sha256 the first time it is read,
    ``"full"`` checks every shard now, ``"size"`` only checks file sizes (fast, catches
    truncation but not altered bytes).
    """

    def __init__(self, folder: str | Path, verify: str = "lazy"):
        self.folder = Path(folder)
        if verify not in ("lazy", "full", "size"):
            raise ValueError(f"verify must be 'lazy', 'full' or 'size', not {verify!r}")
        path = self.folder / MANIFEST
        if not path.exists():
            raise StoreError(f"{self.folder} is not an activation store (no {MANIFEST}); harvest one first")
        try:
            self.manifest = StoreManifest.from_json(path.read_text())
        except (ValueError, TypeError, KeyError) as err:
            raise StoreError(f"{path} is damaged or truncated ({type(err).__name__}: {err}); the shards cannot be "
                             "trusted without it: harvest this store again (--overwrite) or into a new folder") from None
        problem = self.manifest.statistics_problem()
        if problem:
            raise StoreError(f"{path} holds damaged statistics ({problem}); training would scale its inputs by "
                             "them: harvest this store again (--overwrite) or into a new folder")
        if self.manifest.format_version != FORMAT_VERSION:
            raise StoreError(f"{self.folder} has store format {self.manifest.format_version}, this saelib reads {FORMAT_VERSION}")
        self._verified: set[int] = set()
        for index in range(len(self.manifest.shards)):
            self._check_size(index)
            if verify == "full":
                self._check_sha(index)

    # -- description -------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.manifest.d_in

    @property
    def hook(self) -> str:
        return self.manifest.hook

    @property
    def n_rows(self) -> int:
        return self.manifest.n_rows

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        m = self.manifest
        state = "complete" if m.complete else f"incomplete: {m.n_rows}/{m.expected_rows} rows"
        return f"ActivationStore({m.model} {m.hook}, d_in={m.d_in}, {m.n_rows} rows in {len(m.shards)} shards, {m.dtype}, {state})"

    def fingerprint(self) -> dict:
        """What identifies the data in this store: model (name and weights hash), hook, the
        token windows' sha256, row count, BOS handling and dtype. Trainer checkpoints and
        saved SAEs record it, so a run never resumes on, or stands in for, other data."""
        m = self.manifest
        return {"model": m.model, "model_fingerprint": m.model_fingerprint, "hook": m.hook,
                "contexts_sha256": m.contexts_sha256, "n_rows": m.n_rows, "first_position": m.first_position,
                "dtype": m.dtype, "special_token_ids": m.special_token_ids}

    def locate_non_finite(self) -> str | None:
        """Where the first NaN or infinite value is (``"shard shard_00003.npy, row 17 (store row
        20497)"``) and how many rows hold one; None when every row is finite. Reads every shard."""
        first, count, offset = None, 0, 0
        for index, info in enumerate(self.manifest.shards):
            bad_rows = np.flatnonzero(~np.isfinite(self.shard(index)).all(axis=1))
            if len(bad_rows) and first is None:
                first = f"shard {info.file}, row {int(bad_rows[0])} (store row {offset + int(bad_rows[0])})"
            count += len(bad_rows)
            offset += info.rows
        return None if first is None else f"{first}; {count} rows in all"

    @property
    def mean(self) -> torch.Tensor:
        """Per-dimension mean of all rows: [d_in] float32."""
        return torch.tensor(self.manifest.mean, dtype=torch.float32)

    @property
    def norm_scale(self) -> float:
        """Factor that brings the mean squared norm to ``d_in`` (rows of unit RMS), the usual
        input normalisation for SAE training; an SAE trained on scaled rows is folded back on save."""
        return float((self.d_in / max(self.manifest.mean_sq_norm, 1e-12)) ** 0.5)

    # -- checks ------------------------------------------------------------------------
    def _shard_path(self, index: int) -> Path:
        return self.folder / self.manifest.shards[index].file

    def _check_size(self, index: int) -> None:
        info, path = self.manifest.shards[index], self._shard_path(index)
        if not path.exists():
            raise CorruptShardError(f"shard {path} is listed in the manifest but missing; {self._fix_hint(index)}")
        expected = _npy_bytes(info.rows, self.d_in, self.manifest.dtype)
        actual = path.stat().st_size
        if actual != expected:
            raise CorruptShardError(
                f"shard {path} is truncated or damaged: {actual} bytes, expected {expected} "
                f"for {info.rows} x {self.d_in} {self.manifest.dtype}; {self._fix_hint(index)}"
            )

    def _check_sha(self, index: int) -> None:
        if index in self._verified:
            return
        info, path = self.manifest.shards[index], self._shard_path(index)
        if sha256_file(path) != info.sha256:
            raise CorruptShardError(f"shard {path} fails its sha256 check (altered or damaged); {self._fix_hint(index)}")
        self._verified.add(index)

    def verify(self, indices: Iterable[int] | None = None) -> None:
        """Check the sha256 of shards ``indices`` (default: all) now; raises ``CorruptShardError``."""
        for index in range(len(self.manifest.shards)) if indices is None else indices:
            self._check_sha(index)

    def trust_verified(self, indices: Iterable[int]) -> None:
        """Treat shards ``indices`` as checked: another process of the same run checked them
        (each rank of a distributed run checks its share, and they exchange the outcome)."""
        self._verified.update(int(i) for i in indices)

    def _fix_hint(self, index: int) -> str:
        return (
            f"run the same harvest again with resume: it re-checks the shards and rewrites shard {index} "
            "onwards (or delete the store folder and harvest from scratch)"
        )

    def require(self, d_in: int | None = None, model=None, model_name: str | None = None, hook: str | None = None) -> None:
        """Raise ``StoreMismatchError`` unless the store fits this SAE width / model / hook."""
        m = self.manifest
        if d_in is not None and d_in != m.d_in:
            raise StoreMismatchError(
                f"d_in mismatch: the SAE expects vectors of length {d_in}, but store {self.folder} "
                f"({m.hook}) holds length {m.d_in}; build the SAE with d_in={m.d_in} or use a store of the right hook"
            )
        if hook is not None and hook != m.hook:
            raise StoreMismatchError(f"store {self.folder} holds activations of hook {m.hook!r}, but the SAE reads {hook!r}: "
                                     f"use a store harvested at {hook!r} (or an SAE made for {m.hook!r})")
        if model_name is not None and model_name != m.model:
            raise StoreMismatchError(f"store {self.folder} was harvested from model {m.model!r}, not {model_name!r}")
        if model is not None:
            from .models import model_fingerprint, same_model

            if not same_model(model, m.model_fingerprint, m.model_signature):
                raise StoreMismatchError(
                    f"store {self.folder} was harvested from a different model ({m.model!r}, weights "
                    f"{m.model_fingerprint}) than the one loaded (weights {model_fingerprint(model)}); "
                    "harvest again with this model, or load the model the store came from"
                )

    # -- reading -----------------------------------------------------------------------
    def shard(self, index: int) -> np.ndarray:
        """Shard ``index`` memory-mapped read-only: [rows, d_in] in the stored dtype."""
        self._check_sha(index)
        return np.load(self._shard_path(index), mmap_mode="r")

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` in store order as float32, the range clipped to the store:
        [rows in range, d_in]."""
        return self.gather(np.arange(max(start, 0), min(stop, self.n_rows)))

    def gather(self, rows: np.ndarray) -> torch.Tensor:
        """Rows at store indices ``rows`` (any order, repeats allowed) as float32:
        [len(rows), d_in]. Each shard is indexed once, at its rows in increasing order; the
        shards are memory-mapped, so rows not asked for are not copied."""
        rows = np.asarray(rows, dtype=np.int64)
        # Allocated by torch: numpy asks for transparent huge pages for arrays of 4 MiB or
        # more, and on a VM that hands free memory back to its host they come slowly (the
        # first 100k rows of a 1024-wide store in a new process: 5.6-7.5 s, 0.9 s this way).
        out_ND = torch.empty(len(rows), self.d_in, dtype=torch.float32)
        out = out_ND.numpy()
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise IndexError(f"rows {rows.min()}..{rows.max()} are outside store {self.folder} ({self.n_rows} rows)")
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        starts = self._shard_starts()
        bounds = np.searchsorted(sorted_rows, starts)  # where each shard's rows begin in sorted_rows
        for index in range(len(self.manifest.shards)):
            lo, hi = bounds[index], bounds[index + 1]
            if lo < hi:
                out[order[lo:hi]] = self.shard(index)[sorted_rows[lo:hi] - starts[index]]
        return out_ND

    def _shard_starts(self) -> np.ndarray:
        """First store row of each shard, then the row count: int64 [n_shards + 1]."""
        return np.concatenate([[0], np.cumsum([info.rows for info in self.manifest.shards], dtype=np.int64)])

    def iter_batch_rows(
        self,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        buffer_rows: int = 1 << 18,
        chunk_rows: int = 2048,
        epochs: int = 1,
        drop_last: bool = True,
        skip_special: bool = False,
    ) -> Iterator[np.ndarray]:
        """The store rows of each batch, int64 [batch_size], worked out from the manifest (and,
        for ``skip_special``, the token records) without reading an activation.

        With ``shuffle``, chunks of ``chunk_rows`` consecutive rows are visited in random
        order across all shards and mixed in a buffer of at most ``buffer_rows`` rows, so a
        batch draws from a bounded window of the store and RAM use does not grow with it.
        ``skip_special`` leaves out rows at special tokens (``manifest.special_token_ids``).
        The stream depends only on these arguments and the manifest, so every rank of a
        distributed run draws the same global batches and reads only its own rows of each.
        """
        rng = np.random.default_rng(seed)
        starts = self._shard_starts()
        chunks = [
            (starts[index] + lo, starts[index] + min(lo + chunk_rows, info.rows))
            for index, info in enumerate(self.manifest.shards)
            for lo in range(0, info.rows, chunk_rows)
        ]
        buffer_rows = max(buffer_rows, 2 * batch_size)
        for _ in range(epochs):
            order = rng.permutation(len(chunks)) if shuffle else range(len(chunks))
            buffer: list[np.ndarray] = []
            held = 0
            for chunk_index in order:
                lo, hi = chunks[chunk_index]
                piece = np.arange(lo, hi, dtype=np.int64)
                if skip_special:
                    piece = piece[~self.special_rows(lo, hi)]
                buffer.append(piece)
                held += len(piece)
                if held >= buffer_rows:
                    pool = np.concatenate(buffer)
                    if shuffle:
                        pool = pool[rng.permutation(len(pool))]
                    # Emit half the pool and keep the rest to mix with rows still to come.
                    n_out = (len(pool) // 2 // batch_size) * batch_size
                    for b in range(0, n_out, batch_size):
                        yield pool[b : b + batch_size]
                    buffer, held = [pool[n_out:]], len(pool) - n_out
            if buffer:
                pool = np.concatenate(buffer)
                if shuffle:
                    pool = pool[rng.permutation(len(pool))]
                for b in range(0, len(pool), batch_size):
                    if b + batch_size <= len(pool) or not drop_last:
                        yield pool[b : b + batch_size]

    def iter_batches(self, batch_size: int, shuffle: bool = True, seed: int = 0, buffer_rows: int = 1 << 18,
                     chunk_rows: int = 2048, epochs: int = 1, drop_last: bool = True,
                     skip_special: bool = False) -> Iterator[torch.Tensor]:
        """Float32 batches [batch_size, d_in] over the store, ``epochs`` times: the rows of
        ``iter_batch_rows`` (same arguments, which it describes), read."""
        for rows in self.iter_batch_rows(batch_size, shuffle, seed, buffer_rows, chunk_rows, epochs, drop_last,
                                         skip_special):
            yield self.gather(rows)

    # -- token records -----------------------------------------------------------------
    def contexts(self) -> np.ndarray:
        """The token windows the rows came from: [n_contexts, context_len] int32 (memory-mapped),
        checked against the manifest's sha256 on first use."""
        path = self.folder / CONTEXTS
        try:
            contexts = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise CorruptShardError(f"{path} cannot be read ({err}); {self._contexts_hint()}") from None
        if not getattr(self, "_contexts_verified", False):
            if hashlib.sha256(np.ascontiguousarray(contexts).tobytes()).hexdigest() != self.manifest.contexts_sha256:
                raise CorruptShardError(f"{path} fails its sha256 check (altered or damaged): its token ids cannot be "
                                        f"trusted; {self._contexts_hint()}")
            self._contexts_verified = True
        return contexts

    def _contexts_hint(self) -> str:
        return ("rerun the same harvest command with --overwrite (the token windows are the input; the shards "
                f"are only as good as them) or harvest into a new folder than {self.folder}")

    def locate(self, rows: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """(context index, token position) of store rows."""
        rows = np.asarray(rows)
        per = self.manifest.rows_per_context
        return rows // per, self.manifest.first_position + rows % per

    def tokens_of(self, rows: np.ndarray | int) -> np.ndarray:
        """Token id at each store row."""
        context, position = self.locate(rows)
        return np.asarray(self.contexts()[context, position])

    def special_rows(self, start: int, stop: int) -> np.ndarray:
        """bool [stop - start]: which of rows ``start:stop`` sit at a special token."""
        if not self.manifest.special_token_ids:
            return np.zeros(max(0, stop - start), dtype=bool)
        return np.isin(self.tokens_of(np.arange(start, stop)), self.manifest.special_token_ids)
