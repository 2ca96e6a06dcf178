"""Copy a trained embedded model from the build folder into ``data/``.

``data/`` then holds everything ``load_model("embedded")`` and the notebooks need:
weights (safetensors), config, tokenizer, the IOI name pool, a tokenized sample of
held-out text for harvesting and dashboards, and how the model was trained.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..paths import data_dir
from .corpus import sha256_file
from .train_lm import TrainLMConfig

SAMPLE_FILE = "tokens_sample.npy"
HELDOUT_FILE = "tokens_heldout.npy"


def token_windows(tokens: np.ndarray, n_ctx: int, n_rows: int | None, bos_id: int, seed: int | None = 0) -> np.ndarray:
    """[n_rows, n_ctx] uint16 non-overlapping windows of ``tokens``, each BOS + n_ctx-1 tokens.

    ``seed=None`` keeps them in corpus order (all of them when ``n_rows`` is None);
    otherwise ``n_rows`` windows are drawn at random, so every source is represented.
    """
    body = n_ctx - 1
    available = len(tokens) // body
    if seed is None:
        chosen = np.arange(available if n_rows is None else min(n_rows, available))
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(available, size=min(n_rows, available), replace=False))
    rows = np.stack([np.asarray(tokens[i * body : (i + 1) * body]) for i in chosen]).astype(np.uint16)
    return np.concatenate([np.full((len(rows), 1), bos_id, dtype=np.uint16), rows], axis=1)


def export_embedded(
    build_dir: Path,
    out_dir: Path | None = None,
    sample_rows: int = 16_384,
    sample_ctx: int = 128,
    run_name: str = "run",
) -> Path:
    """Write the run in ``build_dir/run_name`` to ``out_dir`` (default ``data/``); returns ``out_dir``."""
    build_dir = Path(build_dir)
    out_dir = Path(out_dir or data_dir())
    out_dir.mkdir(parents=True, exist_ok=True)
    state = torch.load(build_dir / run_name / "checkpoint.pt", weights_only=True, map_location="cpu")
    train_cfg = TrainLMConfig.from_dict(state["train_cfg"])
    meta = json.loads((build_dir / "tokens" / "meta.json").read_text())
    tokenizer_path = build_dir / "tokenizer.json"
    if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != sha256_file(tokenizer_path):
        raise ValueError(f"{tokenizer_path} is not the tokenizer the tokens were made with: re-run `zoo corpus`")

    save_file({k: v.contiguous() for k, v in state["model"].items()}, str(out_dir / "model.safetensors"))
    train_cfg.model.save(out_dir / "config.json")
    shutil.copyfile(tokenizer_path, out_dir / "tokenizer.json")
    shutil.copyfile(build_dir / "name_pool.json", out_dir / "name_pool.json")
    bos = meta["eot_token_id"]
    train = np.memmap(build_dir / "tokens" / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(build_dir / "tokens" / "val.bin", dtype=np.uint16, mode="r")
    # SAE training and dashboards read the sample; evaluations of the LM itself read held-out text.
    np.save(out_dir / SAMPLE_FILE, token_windows(train, sample_ctx, sample_rows, bos, seed=0))
    np.save(out_dir / HELDOUT_FILE, token_windows(val, sample_ctx, None, bos, seed=None))
    training = {
        "steps": int(state["step"]),
        "tokens seen": int(state["step"]) * train_cfg.batch_size * train_cfg.model.n_ctx,
        "schedule tokens": train_cfg.total_tokens,
        "batch (sequences x n_ctx)": f"{train_cfg.batch_size} x {train_cfg.model.n_ctx}",
        "peak lr": train_cfg.lr,
        "repeated-chunk share": train_cfg.repeat_share,
        "repeated-random-tokens share": train_cfg.random_repeat_share,
        "repeat layout": f"{train_cfg.repeat_layout} (chunks of {train_cfg.min_repeat_len}+ tokens)"
        if train_cfg.repeat_layout == "random"
        else "half (chunk, then its copy)",
        "started from": train_cfg.init_from or "random initialisation",
        "bf16 autocast": train_cfg.bf16,
        "train tokens in corpus": meta["splits"]["train"]["tokens"],
        "token files": f"{SAMPLE_FILE}: {sample_rows} x {sample_ctx} windows of training text; "
        f"{HELDOUT_FILE}: the held-out split in {sample_ctx}-token windows (BOS first)",
    }
    (out_dir / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return out_dir
