"""Copy a trained embedded model from the build folder into ``data/``.

``data/`` then holds everything ``load_model("embedded")`` and the notebooks need:
weights (safetensors), config, tokenizer, the IOI name pool, a tokenized sample of
held-out text for harvesting and dashboards, and how the model was trained.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..paths import data_dir
from .train_lm import TrainLMConfig

SAMPLE_FILE = "tokens_sample.npy"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def token_sample(tokens: np.ndarray, n_ctx: int, n_rows: int, bos_id: int, seed: int = 0) -> np.ndarray:
    """[n_rows, n_ctx] uint16 windows of ``tokens`` (each BOS + n_ctx-1 tokens), in order, non-overlapping."""
    body = n_ctx - 1
    n_rows = min(n_rows, len(tokens) // body)
    rows = np.asarray(tokens[: n_rows * body]).reshape(n_rows, body)
    return np.concatenate([np.full((n_rows, 1), bos_id, dtype=np.uint16), rows.astype(np.uint16)], axis=1)


def export_embedded(build_dir: Path, out_dir: Path | None = None, sample_rows: int = 16_384, sample_ctx: int = 128) -> Path:
    """Write the run in ``build_dir/run`` to ``out_dir`` (default ``data/``); returns ``out_dir``."""
    build_dir = Path(build_dir)
    out_dir = Path(out_dir or data_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    state = torch.load(build_dir / "run" / "checkpoint.pt", weights_only=True, map_location="cpu")
    train_cfg = TrainLMConfig.from_dict(state["train_cfg"])
    meta = json.loads((build_dir / "tokens" / "meta.json").read_text())
    tokenizer_path = build_dir / "tokenizer.json"
    if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != _sha256(tokenizer_path):
        raise ValueError(f"{tokenizer_path} is not the tokenizer the tokens were made with: re-run `zoo corpus`")

    save_file({k: v.contiguous() for k, v in state["model"].items()}, str(out_dir / "model.safetensors"))
    train_cfg.model.save(out_dir / "config.json")
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.json")
    shutil.copyfile(build_dir / "name_pool.json", out_dir / "name_pool.json")
    val = np.memmap(build_dir / "tokens" / "val.bin", dtype=np.uint16, mode="r")
    np.save(out_dir / SAMPLE_FILE, token_sample(val, sample_ctx, sample_rows, meta["eot_token_id"]))
    training = {
        "steps": int(state["step"]),
        "tokens seen": int(state["step"]) * train_cfg.batch_size * train_cfg.model.n_ctx,
        "schedule tokens": train_cfg.total_tokens,
        "batch (sequences x n_ctx)": f"{train_cfg.batch_size} x {train_cfg.model.n_ctx}",
        "peak lr": train_cfg.lr,
        "repeated-chunk share": train_cfg.repeat_share,
        "bf16 autocast": train_cfg.bf16,
        "train tokens in corpus": meta["splits"]["train"]["tokens"],
        "sample file": f"{SAMPLE_FILE}: {sample_rows} x {sample_ctx} held-out tokens (BOS first)",
    }
    (out_dir / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return out_dir
