"""Token windows to run models on: the embedded sample, re-tokenised for any other model.

The embedded model ships ``data/tokens_sample.npy`` (training-distribution text) and
``data/tokens_heldout.npy`` (its held-out split), both [rows, 128] with BOS first. For a
pretrained model (Pythia, GPT-2) the same text is decoded and re-tokenised with that
model's tokenizer, so every notebook sees comparable text offline, whatever the model.
"""

from __future__ import annotations

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


def token_windows(model, n_tokens: int, context_len: int = 128, split: str = "train", seed: int | None = 0) -> torch.Tensor:
    """About ``n_tokens`` tokens as [n_contexts, context_len] int64 windows, BOS first.

    ``seed=None`` takes windows in file order; otherwise a random subset (a fixed
    function of ``seed``). Raises if the shipped text holds fewer tokens than asked.
    """
    windows = embedded_windows(split)
    n_contexts = max(1, -(-n_tokens // context_len))
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
            f"asked for {n_contexts} windows of {context_len} tokens, but the {split} text holds {len(body)}: "
            "ask for fewer tokens"
        )
    chosen = np.arange(n_contexts) if seed is None else np.sort(np.random.default_rng(seed).choice(len(body), n_contexts, replace=False))
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None and model.tokenizer.bos_token_id is not None else 0
    rows = torch.from_numpy(body[chosen].astype(np.int64))
    return torch.cat([torch.full((n_contexts, 1), bos, dtype=torch.int64), rows], dim=1)


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
