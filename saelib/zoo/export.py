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
from ..files import sha256_file
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


def training_stages(state: dict) -> list[dict]:
    """The runs that made a checkpoint, first to last: a run that started from another run's
    checkpoint (``init_from``) follows that run's own stages."""
    cfg = TrainLMConfig.from_dict(state["train_cfg"])
    step = int(state["step"])
    stage = {"cfg": cfg, "steps": step, "tokens": step * cfg.batch_size * cfg.model.n_ctx, "run": cfg.out_dir}
    earlier = Path(cfg.init_from) if cfg.init_from else None
    if earlier is None or earlier.suffix != ".pt":
        stage["start"] = str(earlier) if earlier else "random initialisation"
        return [stage]
    if not earlier.exists():
        raise FileNotFoundError(f"{earlier}, where run {cfg.out_dir} started, is gone: its training cannot be described")
    stage["start"] = f"the previous stage's weights ({cfg.init_from})"
    return [*training_stages(torch.load(earlier, weights_only=True, map_location="cpu")), stage]


def describe_stage(stage: dict) -> str:
    """One line: steps, schedule, learning rate and data mix of a training stage."""
    cfg: TrainLMConfig = stage["cfg"]
    mix = f"{cfg.repeat_share:.0%} text repeats + {cfg.random_repeat_share:.0%} random-token repeats ({cfg.repeat_layout} layout)"
    if cfg.copy_warmup_steps:
        kind = f"periodic, period {cfg.min_repeat_len}-{cfg.copy_warmup_period}" if cfg.copy_warmup_period else "repeats"
        mix += f"; first {cfg.copy_warmup_steps} steps {cfg.copy_warmup_share:.0%} random-token rows ({kind})"
    if cfg.focus_source and cfg.focus_share:
        mix += f"; {cfg.focus_share:.0%} of rows start in {cfg.focus_source}"
    return (
        f"{stage['steps']} of {cfg.steps()} steps ({stage['tokens'] / 1e6:.1f}M tokens) of a "
        f"{cfg.total_tokens / 1e6:g}M-token cosine schedule, from {stage['start']} (run {stage['run']}); batch {cfg.batch_size} x {cfg.model.n_ctx}, "
        f"peak lr {cfg.lr:g}, warm-up {cfg.warmup_steps} steps; rows: {mix}; trained on {cfg.device}"
    )


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
    stages = training_stages(state)
    training = {
        "steps": sum(stage["steps"] for stage in stages),
        "tokens seen": sum(stage["tokens"] for stage in stages),
        **{f"stage {i}": describe_stage(stage) for i, stage in enumerate(stages, 1)},
        "bf16 autocast": train_cfg.bf16,
        "train tokens in corpus": meta["splits"]["train"]["tokens"],
        "token files": f"{SAMPLE_FILE}: {sample_rows} x {sample_ctx} windows of training text; "
        f"{HELDOUT_FILE}: the held-out split in {sample_ctx}-token windows (BOS first)",
    }
    (out_dir / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    return out_dir
