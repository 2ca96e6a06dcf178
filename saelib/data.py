"""Token windows to run models on: the embedded sample, re-tokenised for any other model.

The embedded model ships ``data/tokens_sample.npy`` (training-distribution text) and
``data/tokens_heldout.npy`` (its held-out split), both [rows, 128] with BOS first. For a
pretrained model (Pythia, GPT-2) the same text is decoded and re-tokenised with that
model's tokenizer, so every notebook sees comparable text offline, whatever the model.

Where more text is needed than ships (the ``full`` profile asks for tens of millions of
tokens), ``text=`` or ``$SAELIB_TEXT`` names a Hugging Face text dataset, streamed from the
hub (``NeelNanda/pile-10k``, ``monology/pile-uncopyrighted``) or read from local files
(a ``.jsonl``/``.txt``/``.parquet`` file or a folder of them), tokenised on the fly with the
model's tokenizer.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .paths import data_dir
from .zoo.tokenizer import load_tokenizer

SPLITS = {"train": "tokens_sample.npy", "heldout": "tokens_heldout.npy"}


def embedded_windows(split: str = "train") -> np.ndarray:
    """The shipped token windows of the embedded tokenizer: [rows, 128] uint16, BOS first."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, not {split!r}")
    path = data_dir() / SPLITS[split]
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: restore data/ with `git checkout -- data/`")
    return np.load(path, mmap_mode="r")


def special_token_ids(model) -> list[int]:
    """The ids of the model's special tokens (BOS, end-of-text, padding...), sorted; empty
    without a tokenizer. Mid-sequence ones mark document boundaries and behave like BOS:
    activations there are several times the typical norm."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return []
    return sorted({int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None})


def _uses_embedded_tokenizer(model) -> bool:
    return model.cfg.model_name == "saelib-embedded" or model.cfg.original_architecture == "saelib-embedded"


TEXT_ENV = "SAELIB_TEXT"
EMBEDDED_TEXT = "embedded"


def text_source(text: str | None = None) -> str:
    """The text to run models on: ``text``, else ``$SAELIB_TEXT``, else ``"embedded"`` (the
    shipped sample); anything else names a Hugging Face dataset or local text files."""
    return (text or os.environ.get(TEXT_ENV, "") or EMBEDDED_TEXT).strip()


def token_windows(model, n_tokens: int, context_len: int = 128, split: str = "train", seed: int | None = 0,
                  text: str | None = None) -> torch.Tensor:
    """About ``n_tokens`` tokens as [n_contexts, context_len] int64 windows, BOS first.

    ``seed=None`` takes windows in file order; otherwise a random subset (a fixed
    function of ``seed``). Raises if the text holds fewer tokens than asked. ``text``: see
    ``text_source`` (default: the shipped sample).
    """
    if n_tokens <= 0 or context_len < 2:
        raise ValueError(f"asked for {n_tokens} tokens in windows of {context_len}: both must be positive "
                         "(a window holds BOS and at least one token)")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and context_len > n_ctx:
        raise ValueError(f"context_len {context_len} is longer than the model's n_ctx {n_ctx}: use {n_ctx} or less")
    n_contexts = max(1, -(-n_tokens // context_len))
    source = text_source(text)
    if source != EMBEDDED_TEXT:
        return _with_bos(model, dataset_rows(model, source, n_contexts, context_len - 1, split, seed))
    windows = embedded_windows(split)
    if _uses_embedded_tokenizer(model):
        if context_len > windows.shape[1]:
            raise ValueError(f"context_len {context_len} exceeds the shipped windows' {windows.shape[1]} tokens")
        # Cut each shipped window into whole pieces, never joining text from two windows.
        per_window = (windows.shape[1] - 1) // (context_len - 1)
        body = np.asarray(windows[:, 1 : 1 + per_window * (context_len - 1)]).reshape(-1, context_len - 1)
    else:
        body = _retokenize(model, windows, context_len - 1, n_contexts if seed is None else None)
    if n_contexts > len(body):
        raise ValueError(
            f"asked for {n_contexts} windows of {context_len} tokens, but the shipped {split} text holds {len(body)}: "
            f"ask for fewer tokens, or name a larger text with {TEXT_ENV} / text= (a Hugging Face dataset "
            "such as NeelNanda/pile-10k, or local .jsonl/.txt files)"
        )
    chosen = np.arange(n_contexts) if seed is None else np.sort(np.random.default_rng(seed).choice(len(body), n_contexts, replace=False))
    return _with_bos(model, body[chosen])


def _with_bos(model, rows: np.ndarray) -> torch.Tensor:
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None and model.tokenizer.bos_token_id is not None else 0
    rows_t = torch.from_numpy(np.asarray(rows).astype(np.int64))
    return torch.cat([torch.full((len(rows_t), 1), bos, dtype=torch.int64), rows_t], dim=1)


class TextNeedsNetworkError(RuntimeError):
    """A hub dataset was named but the hub cannot be reached (and it is not cached)."""


HELDOUT_SHARE = 20
"""One document in this many (chosen by a hash of its text, so the same whatever the order
or seed) is held out: ``split="heldout"`` reads those, ``"train"`` the others."""

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet"}


def _open_dataset(name: str):
    """A streaming iterable of documents from local files or the Hugging Face hub."""
    from datasets import load_dataset

    from .models import is_local_path

    path = Path(name).expanduser()
    if is_local_path(name):
        files = sorted(f for f in path.rglob("*") if f.suffix in LOCAL_FORMATS) if path.is_dir() else [path]
        if not files or not path.exists():
            raise FileNotFoundError(f"text {name}: no {'/'.join(LOCAL_FORMATS)} files there")
        kinds = {LOCAL_FORMATS.get(f.suffix) for f in files}
        if len(kinds) != 1 or None in kinds:
            raise ValueError(f"text {name}: use files of one kind ({', '.join(LOCAL_FORMATS)}), found "
                             f"{', '.join(sorted(f.suffix for f in files))}")
        return load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train", streaming=True)
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
    try:
        return load_dataset(name, split="train", streaming=True)
    except Exception as err:  # the hub client raises many types when offline
        from .models import _hub_reachable

        if offline or not _hub_reachable():
            raise TextNeedsNetworkError(
                f"text {name!r} is a Hugging Face dataset and the hub cannot be reached here: unset {TEXT_ENV} to use "
                "the shipped text, or point it at local .jsonl/.txt/.parquet files") from err
        raise ValueError(f"text {name!r}: the Hugging Face hub could not open it ({err})") from err


def dataset_rows(model, name: str, n_rows: int, body_len: int, split: str = "train", seed: int | None = 0,
                 column: str = "text") -> np.ndarray:
    """``n_rows`` rows of ``body_len`` token ids [n_rows, body_len] from a text dataset (see
    module docstring), each document tokenised with the model's tokenizer and cut into whole
    rows (none spans two documents). ``seed`` shuffles the stream (a 10,000-document buffer);
    ``None`` keeps its order."""
    from tqdm.auto import tqdm

    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, not {split!r}")
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: pass token ids directly")
    stream = _open_dataset(name)
    if seed is not None:
        stream = stream.shuffle(seed=seed, buffer_size=10_000)
    rows: list[list[int]] = []
    with tqdm(total=n_rows, desc=f"tokenising {name} ({split})", unit="row", leave=False) as bar:
        for document in stream:
            if column not in document:
                raise ValueError(f"text {name!r} has no {column!r} column (it has {', '.join(document)})")
            text = document[column] or ""
            if (zlib.crc32(text.encode()) % HELDOUT_SHARE == 0) != (split == "heldout"):
                continue
            ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
            new = [ids[i : i + body_len] for i in range(0, len(ids) - body_len + 1, body_len)]
            rows.extend(new[: n_rows - len(rows)])
            bar.update(min(len(new), bar.total - bar.n))
            if len(rows) >= n_rows:
                break
    if len(rows) < n_rows:
        raise ValueError(f"text {name!r} ({split}) holds only {len(rows)} rows of {body_len + 1} tokens, "
                         f"not the {n_rows} asked for: ask for fewer tokens or name a larger text")
    return np.asarray(rows, dtype=np.int64).reshape(n_rows, body_len)


def _retokenize(model, windows: np.ndarray, body_len: int, enough: int | None) -> np.ndarray:
    """Decode the embedded windows to text and cut each one's ids under the model's own
    tokenizer into rows of ``body_len``; stops after ``enough`` rows when given."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: pass token ids directly")
    embedded_tokenizer = load_tokenizer(data_dir() / "tokenizer.json")
    rows: list[list[int]] = []
    for start in range(0, len(windows), 256):
        for text in embedded_tokenizer.batch_decode(np.asarray(windows[start : start + 256, 1:]).tolist()):
            ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.extend(ids[i : i + body_len] for i in range(0, len(ids) - body_len + 1, body_len))
        if enough is not None and len(rows) >= enough:
            break
    return np.asarray(rows, dtype=np.int64).reshape(-1, body_len)
