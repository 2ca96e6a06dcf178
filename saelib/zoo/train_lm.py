"""Resumable training of the embedded language model (``LeanGPT``) on a token file.

Every batch is a pure function of ``(seed, step)``, and checkpoints hold the model, the
optimiser and the step, so a run killed and resumed from its last checkpoint takes
exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .lm import LeanGPT, LMConfig


@dataclass
class TrainLMConfig:
    """How to train the embedded model; fields are saved with every checkpoint."""

    train_tokens: str = "build/zoo/tokens/train.bin"
    """Flat uint16 token file (documents separated by the BOS/EOS token)."""
    val_tokens: str = "build/zoo/tokens/val.bin"
    """Held-out token file in the same format."""
    out_dir: str = "build/zoo/run"
    """Where checkpoints and the metrics log go."""
    model: LMConfig = field(default_factory=LMConfig)
    """Model shape."""
    bos_token_id: int = 0
    """Prepended to every training sequence, as HookedTransformer does at inference."""
    batch_size: int = 32
    """Sequences per step; tokens per step = batch_size * n_ctx."""
    total_tokens: int = 20_000_000
    """Length of the learning-rate schedule, in tokens."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 200
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not on biases, LayerNorm or embeddings)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    repeat_share: float = 0.1
    """Share of sequences made of a real-text chunk followed by its exact copy, to reward
    in-context copying (induction) early."""
    random_repeat_share: float = 0.0
    """Share of sequences made of uniformly random tokens followed by their exact copy: text
    lets a model lower its loss from n-gram statistics alone, random tokens only by copying."""
    copy_warmup_steps: int = 0
    """For this many first steps, ``copy_warmup_share`` of rows are repeated random tokens
    instead of ``random_repeat_share``: a copy curriculum, so induction heads form before
    the model settles into n-gram statistics."""
    copy_warmup_share: float = 0.5
    """Share of repeated random-token rows during the copy warm-up."""
    copy_warmup_period: int = 0
    """If positive, copy warm-up rows are periodic instead: one random-token chunk of
    ``min_repeat_len`` to ``copy_warmup_period`` tokens repeated to fill the row, so most
    tokens can be copied from a few positions back (a dense signal for induction)."""
    repeat_layout: str = "random"
    """Where a repeated row's two copies sit. ``"random"``: a chunk of random length
    (``min_repeat_len`` to half the window) at a random place, its copy at a random later
    place, text around them, so only copying by content (induction) predicts the copy.
    ``"half"`` (runs before this field existed): the chunk fills the first half and its copy
    the second, which a model can also predict by attending a fixed distance back."""
    min_repeat_len: int = 8
    """Shortest repeated chunk in the ``"random"`` layout, and shortest period of the
    periodic copy warm-up, in tokens."""
    focus_source: str = ""
    """A corpus source to over-sample (e.g. ``"stories"``); its span of the train file comes
    from the ``meta.json`` beside it."""
    focus_share: float = 0.0
    """Share of rows that start inside ``focus_source`` (the rest start anywhere)."""
    seed: int = 0
    """Seeds initialisation and every batch."""
    eval_every: int = 100
    """Steps between held-out evaluations."""
    eval_batches: int = 8
    """Held-out batches per evaluation (fixed across the run)."""
    checkpoint_minutes: float = 5.0
    """Wall-clock minutes between checkpoints."""
    bf16: bool = False
    """Run matmuls under bfloat16 autocast (faster on CPUs with AVX512-BF16 or AMX, and on GPUs)."""
    device: str = "cpu"
    """Where to train: ``"cpu"`` or a GPU (``"cuda"``). Batches are drawn the same way on
    either, and checkpoints hold CPU tensors, so a GPU run's weights load anywhere."""
    init_from: str = ""
    """Start from these weights (a checkpoint.pt of an earlier run, or a .safetensors file)
    instead of a random initialisation: fine-tuning with a fresh schedule and data mix.
    Ignored once this run has its own checkpoint."""

    def steps(self) -> int:
        return max(1, self.total_tokens // (self.batch_size * self.model.n_ctx))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainLMConfig":
        values = dict(values)
        values["model"] = LMConfig.from_dict(values.get("model", {}))
        # Configs saved before repeat_layout existed used the half-and-half layout.
        values.setdefault("repeat_layout", "half")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def open_tokens(path: str | Path) -> np.ndarray:
    """Memory-map a flat uint16 token file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: build the corpus first (python -m saelib zoo corpus)")
    return np.memmap(path, dtype=np.uint16, mode="r")


def source_span(cfg: TrainLMConfig) -> tuple[int, int] | None:
    """[start, end) of ``cfg.focus_source`` in the train token file, or None without a focus."""
    if not (cfg.focus_source and cfg.focus_share > 0):
        return None
    meta_path = Path(cfg.train_tokens).parent / "meta.json"
    sources = json.loads(meta_path.read_text())["splits"]["train"]["sources"]
    if cfg.focus_source not in sources:
        raise ValueError(f"focus_source {cfg.focus_source!r} is not in {meta_path}; sources: {', '.join(sources)}")
    return sources[cfg.focus_source]["start"], sources[cfg.focus_source]["end"]


def sample_batch(tokens: np.ndarray, cfg: TrainLMConfig, step: int, focus: tuple[int, int] | None = None) -> torch.Tensor:
    """The batch for ``step``: [batch_size, n_ctx] int64, each row BOS + text.

    With ``focus`` (a [start, end) span of ``tokens``), a ``focus_share`` of rows start there.

    A ``repeat_share`` of rows repeat a chunk of their own text, and a further share
    (``random_repeat_share``, or ``copy_warmup_share`` early on) repeat a chunk of
    uniformly random tokens; ``repeat_layout`` says where the two copies go.
    """
    if cfg.repeat_layout not in ("random", "half"):
        raise ValueError(f"repeat_layout {cfg.repeat_layout!r} unknown; use 'random' or 'half'")
    rng = np.random.default_rng([cfg.seed, step])
    n_ctx, B = cfg.model.n_ctx, cfg.batch_size
    body = n_ctx - 1
    starts = rng.integers(0, len(tokens) - body, size=B)
    is_repeat = rng.random(B) < cfg.repeat_share
    rows = np.empty((B, n_ctx), dtype=np.int64)
    rows[:, 0] = cfg.bos_token_id
    half = body // 2
    random_share = cfg.copy_warmup_share if step < cfg.copy_warmup_steps else cfg.random_repeat_share
    if random_share > 0:  # drawn only then, so older configs keep their batches
        is_random = (rng.random(B) < random_share) & ~is_repeat
        random_chunks = rng.integers(1, cfg.model.d_vocab, size=(B, half))
    else:
        is_random = np.zeros(B, dtype=bool)
    if cfg.repeat_layout == "random":
        min_len = min(cfg.min_repeat_len, half)
        lengths = rng.integers(min_len, half + 1, size=B)
        # first copy anywhere it leaves room for the second; the second anywhere after it
        firsts = (rng.random(B) * (body - 2 * lengths + 1)).astype(np.int64)
        seconds = firsts + lengths + (rng.random(B) * (body - 2 * lengths - firsts + 1)).astype(np.int64)
    if focus is not None and cfg.focus_share > 0:  # drawn only then, so older configs keep their batches
        in_focus = rng.random(B) < cfg.focus_share
        starts[in_focus] = rng.integers(focus[0], focus[1] - body, size=int(in_focus.sum()))
    periodic = step < cfg.copy_warmup_steps and cfg.copy_warmup_period > 0
    if periodic:
        longest = min(cfg.copy_warmup_period, half)
        periods = rng.integers(min(cfg.min_repeat_len, longest), longest + 1, size=B)
    for i, (start, repeat) in enumerate(zip(starts, is_repeat | is_random)):
        if periodic and is_random[i]:
            rows[i, 1:] = np.resize(random_chunks[i, : periods[i]], body)
        elif not repeat:
            rows[i, 1:] = tokens[start : start + body]
        elif cfg.repeat_layout == "random":
            rows[i, 1:] = tokens[start : start + body]
            length, first, second = lengths[i], 1 + firsts[i], 1 + seconds[i]
            chunk = random_chunks[i, :length] if is_random[i] else rows[i, first : first + length].copy()
            rows[i, first : first + length] = chunk
            rows[i, second : second + length] = chunk
        else:
            chunk = random_chunks[i] if is_random[i] else tokens[start : start + half]
            rows[i, 1 : 1 + half] = chunk
            rows[i, 1 + half : 1 + 2 * half] = chunk
            rows[i, 1 + 2 * half :] = tokens[start + half : start + half + body - 2 * half]
    return torch.from_numpy(rows)


def learning_rate(cfg: TrainLMConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps() - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: LeanGPT, cfg: TrainLMConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters (which must already be on ``cfg.device``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Embeddings, biases and LayerNorm gains are not shrunk towards zero.
        is_matrix = p.ndim >= 2 and not name.startswith(("embed.", "pos_embed."))
        (decay if is_matrix else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # One fused kernel per step instead of a dozen per parameter: on a GPU the small model is launch-bound.
    fused = torch.device(cfg.device).type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temp file then rename, so a kill never leaves a half checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a trainer checkpoint (``.pt``) or a ``.safetensors`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init_from weights {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, weights_only=True, map_location="cpu")["model"]


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s parameters live (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


@torch.no_grad()
def induction_ratio(model: LeanGPT, seq_len: int = 50, n_seqs: int = 16, bos_token_id: int = 0) -> float:
    """Loss on the second copy of a repeated random-token sequence over loss on the first
    (the model card's induction probe, on the training twin): far below 1 once induction heads form."""
    seq_len = min(seq_len, model.cfg.n_ctx // 2)
    device = device_of(model)
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(1234)
    low = min(300, model.cfg.d_vocab // 4)
    random_BL = torch.randint(low, model.cfg.d_vocab, (n_seqs, seq_len), generator=generator)
    tokens = torch.cat([torch.full((n_seqs, 1), bos_token_id), random_BL, random_BL], dim=1)
    tokens = tokens.to(device)
    logits = model(tokens[:, :-1]).float()
    loss_BP = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
    model.train(was_training)
    first = loss_BP[:, 1:seq_len].mean()
    second = loss_BP[:, seq_len + 1 : 2 * seq_len].mean()
    return float(second / first)


@torch.no_grad()
def evaluate(model: LeanGPT, val_tokens: np.ndarray, cfg: TrainLMConfig) -> float:
    """Mean held-out loss over ``eval_batches`` fixed batches (no repeated chunks)."""
    model.eval()
    eval_cfg = dataclasses.replace(cfg, repeat_share=0.0, random_repeat_share=0.0, copy_warmup_steps=0, seed=cfg.seed + 10_000)
    device = device_of(model)
    losses = [model.loss(sample_batch(val_tokens, eval_cfg, i).to(device)).item() for i in range(cfg.eval_batches)]
    model.train()
    return float(np.mean(losses))


class LMTrainer:
    """Owns the model, optimiser and step counter of one training run."""

    def __init__(self, cfg: TrainLMConfig):
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        self.model = LeanGPT(cfg.model).to(self.device)  # initialised on the CPU: the same weights on any device
        self.optimizer = make_optimizer(self.model, cfg)
        self.step = 0
        self.checkpoint_path = self.out_dir / "checkpoint.pt"
        if self.checkpoint_path.exists():
            self.load_checkpoint()
        elif cfg.init_from:
            self.model.load_state_dict(load_weights(cfg.init_from))  # copies onto the model's device

    def load_checkpoint(self) -> None:
        state = torch.load(self.checkpoint_path, weights_only=True, map_location="cpu")
        if state["train_cfg"]["model"] != self.cfg.model.to_dict():
            raise ValueError(
                f"checkpoint {self.checkpoint_path} was made for model {state['train_cfg']['model']}, "
                f"not {self.cfg.model.to_dict()}: use another out_dir or the same model config"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self._forget_metrics_after(self.step)

    def _forget_metrics_after(self, step: int) -> None:
        """Drop log rows of steps past the checkpoint: the resumed run takes them again."""
        log = self.out_dir / "metrics.jsonl"
        if log.exists():
            rows = [r for r in log.read_text().splitlines() if r and json.loads(r)["step"] <= step]
            log.write_text("".join(r + "\n" for r in rows))

    def save_checkpoint(self) -> None:
        save_atomic(
            {
                "model": {name: tensor.cpu() for name, tensor in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "train_cfg": self.cfg.to_dict(),
            },
            self.checkpoint_path,
        )

    def train_step(self, batch: torch.Tensor) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.step)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            loss = self.model.loss(batch.to(self.device, non_blocking=True))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def run(self, max_steps: int | None = None, max_minutes: float | None = None) -> int:
        """Train until the schedule ends, ``max_steps`` more steps, or ``max_minutes``;
        checkpoints on the way and at the end. Returns the step reached."""
        train_tokens = open_tokens(self.cfg.train_tokens)
        val_tokens = open_tokens(self.cfg.val_tokens) if Path(self.cfg.val_tokens).exists() else None
        focus = source_span(self.cfg)
        last_step = self.cfg.steps() if max_steps is None else min(self.cfg.steps(), self.step + max_steps)
        started = last_save = time.time()
        tokens_per_step = self.cfg.batch_size * self.cfg.model.n_ctx
        log = (self.out_dir / "metrics.jsonl").open("a")
        bar = tqdm(total=last_step, initial=self.step, desc="train LM", unit="step")
        self.model.train()
        while self.step < last_step:
            t0 = time.time()
            loss = self.train_step(sample_batch(train_tokens, self.cfg, self.step, focus))
            record = {
                "step": self.step,
                "tokens": self.step * tokens_per_step,
                "loss": loss,
                "lr": learning_rate(self.cfg, self.step - 1),
                "tok_per_s": tokens_per_step / (time.time() - t0),
            }
            if val_tokens is not None and (self.step % self.cfg.eval_every == 0 or self.step == last_step):
                record["val_loss"] = evaluate(self.model, val_tokens, self.cfg)
                record["induction_ratio"] = induction_ratio(self.model, bos_token_id=self.cfg.bos_token_id)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tok_per_s']:.0f}")
            now = time.time()
            if now - last_save > 60 * self.cfg.checkpoint_minutes:
                self.save_checkpoint()
                last_save = now
            if max_minutes is not None and now - started > 60 * max_minutes:
                break
        bar.close()
        log.close()
        self.save_checkpoint()
        return self.step
