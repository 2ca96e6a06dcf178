"""Measure the embedded model against its quality bars and write ``data/MODEL_CARD.md``.

Bars (DESIGN.md): held-out loss at least 0.5 nats below a smoothed bigram baseline;
second copy of a repeated random-token sequence at most 50% of the first copy's loss;
IOI mean logit difference at least 1.0 with at least 80% of prompts positive, on the
standard templates, which the training stories never use.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..paths import data_dir
from .ioi_templates import IOI_EVAL_TEMPLATES
from ..ioi import ioi_logit_diffs, ioi_prompts, model_single_token_names
from ..models import load_embedded
from .probes import induction_losses

BARS = {"bigram_margin_nats": 0.5, "induction_ratio": 0.5, "ioi_logit_diff": 1.0, "ioi_positive": 0.8}


def ngram_counts(train_tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unigram counts [V] and bigram counts [V*V] (flat index prev*V + next) of a token file."""
    unigram = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64)
    pairs = train_tokens[:-1].astype(np.int64) * vocab_size + train_tokens[1:]
    bigram = np.bincount(pairs, minlength=vocab_size * vocab_size).astype(np.float32)
    return unigram, bigram


def spread_windows(tokens: np.ndarray, length: int, max_tokens: int) -> np.ndarray:
    """[n, length] windows at evenly spaced offsets over all of ``tokens`` (at most ``max_tokens``)."""
    n = max(1, min(len(tokens) // length, max_tokens // length))
    starts = np.linspace(0, len(tokens) - length, n).astype(np.int64)
    return np.stack([np.asarray(tokens[s : s + length]) for s in starts])


def ngram_losses(
    unigram: np.ndarray, bigram: np.ndarray, windows: np.ndarray, discount: float = 0.75
) -> tuple[float, float]:
    """Cross-entropy (nats) predicting tokens 1.. of each window ([n, L], or one 1-D sequence) with
    an add-one unigram model and an absolute-discounting bigram interpolated with it."""
    windows = np.atleast_2d(windows)
    V = len(unigram)
    p_uni = (unigram + 1) / (unigram.sum() + V)
    prev, nxt = windows[:, :-1].ravel().astype(np.int64), windows[:, 1:].ravel().astype(np.int64)
    unigram_loss = float(-np.log(p_uni[nxt]).mean())
    counts_2d = bigram.reshape(V, V)
    context_total = counts_2d.sum(axis=1).astype(np.float64)
    distinct_next = (counts_2d > 0).sum(axis=1).astype(np.float64)
    pair_count = counts_2d[prev, nxt].astype(np.float64)
    total = context_total[prev]
    safe_total = np.maximum(total, 1.0)
    # unseen contexts fall back to the unigram entirely
    backoff = np.where(total > 0, discount * distinct_next[prev] / safe_total, 1.0)
    p_bi = np.maximum(pair_count - discount, 0.0) / safe_total + backoff * p_uni[nxt]
    return unigram_loss, float(-np.log(p_bi).mean())


@torch.no_grad()
def model_loss_on(model, windows: np.ndarray, bos_id: int = 0) -> float:
    """Mean loss predicting tokens 1.. of each window ([n, L], L < n_ctx) with BOS prepended,
    the same tokens ``ngram_losses`` scores (token 0 has no in-window context for a bigram)."""
    batch = torch.from_numpy(windows.astype(np.int64))
    batch = torch.cat([torch.full((len(batch), 1), bos_id), batch], dim=1)
    losses = [model(chunk, return_type="loss", loss_per_token=True)[:, 1:] for chunk in batch.split(16)]
    return float(torch.cat(losses).mean())


def measure(model, tokens_dir: Path, names: list[str], n_ioi: int = 200, max_tokens: int = 60_000) -> dict:
    """Every number of the model card."""
    meta = json.loads((tokens_dir / "meta.json").read_text())
    train = np.memmap(tokens_dir / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(tokens_dir / "val.bin", dtype=np.uint16, mode="r")
    unigram, bigram = ngram_counts(np.asarray(train), meta["vocab_size"])
    length = model.cfg.n_ctx - 1

    def losses(windows: np.ndarray) -> dict:
        uni, bi = ngram_losses(unigram, bigram, windows)
        return {"model": model_loss_on(model, windows, meta["eot_token_id"]), "unigram": uni, "bigram": bi}

    rows = {}
    for source, span in meta["splits"]["val"]["sources"].items():
        part = val[span["start"] : span["end"]]
        if len(part) > length:
            rows[source] = {"tokens": int(len(part)), **losses(spread_windows(part, length, max_tokens // 4))}
    overall = losses(spread_windows(val, length, max_tokens))
    induction = induction_losses(model)
    pool = model_single_token_names(model, names)
    prompts = ioi_prompts(pool, n_prompts=n_ioi)
    diffs = ioi_logit_diffs(model, prompts)
    per_template = {
        i: float(diffs[[p.template == i for p in prompts]].mean()) for i in range(len(IOI_EVAL_TEMPLATES))
        if any(p.template == i for p in prompts)
    }
    return {
        "overall": overall,
        "per_source": rows,
        "induction": {"first_copy": induction.first_copy_loss, "second_copy": induction.second_copy_loss, "ratio": induction.ratio},
        "ioi": {
            "n_prompts": len(prompts), "names": pool, "mean_logit_diff": float(diffs.mean()),
            "positive_share": float((diffs > 0).float().mean()), "per_template": per_template,
        },
    }


def passes(numbers: dict) -> dict[str, bool]:
    """Which quality bars ``numbers`` (from ``measure``) meet."""
    return {
        "held-out loss >= 0.5 nats below bigram": numbers["overall"]["bigram"] - numbers["overall"]["model"] >= BARS["bigram_margin_nats"],
        "induction second/first <= 0.5": numbers["induction"]["ratio"] <= BARS["induction_ratio"],
        "IOI mean logit diff >= 1.0": numbers["ioi"]["mean_logit_diff"] >= BARS["ioi_logit_diff"],
        "IOI positive share >= 80%": numbers["ioi"]["positive_share"] >= BARS["ioi_positive"],
    }


def samples(model, prompts: list[str], max_new_tokens: int = 40, seed: int = 0) -> list[str]:
    torch.manual_seed(seed)
    return [
        model.generate(p, max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, verbose=False)
        for p in prompts
    ]


SAMPLE_PROMPTS = [
    "Call me Ishmael.",
    "def read_config(path):",
    "In the beginning",
    "Mr. Speaker, the state of our Union",
    "Lucy and Tom walked to the river. Tom handed the basket to",
]


def render_card(numbers: dict, verdicts: dict, cfg: dict, training: dict, texts: list[str]) -> str:
    o, ind, ioi = numbers["overall"], numbers["induction"], numbers["ioi"]
    lines = [
        "# Embedded model card",
        "",
        "A small GPT-style model trained by this project (`python -m saelib zoo ...`) on public-domain",
        "and permissively licensed text from package registries (sources: `NOTICE`). It exists so that",
        "every saelib notebook runs offline on a CPU. Measured by `python -m saelib zoo card`.",
        "",
        "## Architecture and training",
        "",
        "| | |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in cfg.items()],
        *[f"| {k} | {v} |" for k, v in training.items()],
        "",
        "## Quality bars",
        "",
        "| bar | measured | met |", "|---|---|---|",
        f"| held-out loss ≥ 0.5 nats below smoothed bigram | model {o['model']:.3f}, bigram {o['bigram']:.3f} (margin {o['bigram'] - o['model']:.3f}) | {'yes' if verdicts['held-out loss >= 0.5 nats below bigram'] else 'NO'} |",
        f"| induction: second copy ≤ 50% of first | {ind['second_copy']:.3f} / {ind['first_copy']:.3f} = {ind['ratio']:.1%} | {'yes' if verdicts['induction second/first <= 0.5'] else 'NO'} |",
        f"| IOI mean logit diff (IO − S) ≥ 1.0 | {ioi['mean_logit_diff']:.3f} over {ioi['n_prompts']} prompts | {'yes' if verdicts['IOI mean logit diff >= 1.0'] else 'NO'} |",
        f"| IOI prompts with positive diff ≥ 80% | {ioi['positive_share']:.1%} | {'yes' if verdicts['IOI positive share >= 80%'] else 'NO'} |",
        "",
        "Held-out losses (nats/token, on windows spread over each split; unigram add-one, bigram absolute discounting d=0.75 interpolated with it):",
        "",
        "| source | val tokens | model | unigram | bigram |", "|---|---|---|---|---|",
        f"| **all** | | {o['model']:.3f} | {o['unigram']:.3f} | {o['bigram']:.3f} |",
        *[f"| {s} | {r['tokens']:,} | {r['model']:.3f} | {r['unigram']:.3f} | {r['bigram']:.3f} |" for s, r in numbers["per_source"].items()],
        "",
        "IOI mean logit difference per evaluation template (ABBA and BABA mixed):",
        "",
        "| template | mean diff |", "|---|---|",
        *[f"| {IOI_EVAL_TEMPLATES[int(i)]} | {d:.2f} |" for i, d in ioi["per_template"].items()],
        "",
        f"IOI names ({len(ioi['names'])}, single tokens with a leading space): {', '.join(ioi['names'])}",
        "",
        "## Samples (temperature 0.8, top-k 50)",
        "",
        *[f"```text\n{t}\n```" for t in texts],
        "",
    ]
    return "\n".join(lines)


def write_model_card(build_dir: Path, out_dir: Path | None = None) -> dict:
    """Measure the model in ``data/`` against ``build_dir``'s tokens; write MODEL_CARD.md and quality.json."""
    out_dir = Path(out_dir or data_dir())
    started = time.time()
    model = load_embedded("cpu")
    names = json.loads((out_dir / "name_pool.json").read_text())["names"]
    numbers = measure(model, Path(build_dir) / "tokens", names)
    verdicts = passes(numbers)
    training = json.loads((out_dir / "training.json").read_text()) if (out_dir / "training.json").exists() else {}
    cfg = json.loads((out_dir / "config.json").read_text())
    card = render_card(numbers, verdicts, cfg, training, samples(model, SAMPLE_PROMPTS))
    (out_dir / "MODEL_CARD.md").write_text(card)
    (out_dir / "quality.json").write_text(json.dumps({"numbers": numbers, "bars_met": verdicts}, indent=2) + "\n")
    print(card)
    print(f"measured in {time.time() - started:.0f} s")
    return numbers
