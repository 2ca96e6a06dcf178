"""Harvest activations of several hook points in one forward pass into activation stores.

    stores = harvest(model, token_windows(model, 1_000_000), HarvestConfig(hooks=[
        "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]))

The forward pass stops after the last block any hook needs (``stop_at_layer``), runs
without autograd, and each hook's vectors stream into its own store folder
(``saelib.store``). Re-running the same call after a kill resumes where the stores stopped.

Under ``torchrun`` (an initialised ``torch.distributed``) each rank harvests a contiguous
block of every store's shards into the same folders; rank 0 then writes the manifests. The
stores are the ones one process writes (same shards, checksums, statistics, token
records), and a rerun after a killed rank redoes only the shards not yet on disk.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import special_token_ids
from .distributed import Group
from .models import check_hook_name, hook_layer, model_fingerprint, model_signature
from .paths import artifacts_dir
from .store import ActivationStore, StoreError, StoreManifest
from .store_writer import ShardBlockWriter, StoreWriter, assemble_store, finished_shards, shard_count
from .threads import follow_load

# Hooks outside the blocks that are computed before block 0.
_EMBEDDING_HOOKS = ("hook_embed", "hook_pos_embed", "hook_tokens")


@dataclass
class HarvestConfig:
    """What to harvest and how to store it."""

    hooks: list[str] = field(default_factory=lambda: ["blocks.1.hook_resid_post"])
    """TransformerLens hook names, all filled by the same forward passes."""
    batch_size: int = 32
    """Context windows per forward pass."""
    skip_bos: bool = True
    """Leave out position 0 (BOS): its activations are far larger than any other position's
    and would dominate an SAE's loss. Set False to keep it."""
    dtype: str = "float16"
    """On-disk dtype, ``float16`` (half the disk) or ``float32`` (exact)."""
    shard_mb: float = 64.0
    """Target shard size in MiB; rows per shard follow from d_in and dtype."""
    out_dir: str = ""
    """Parent folder of the stores; default ``<artifacts>/stores/<model>``. Each hook gets
    its own sub-folder named after the hook."""
    overwrite: bool = False
    """Start the stores afresh instead of resuming them."""
    progress: bool = True
    """Show a tqdm bar."""
    adapt_threads: bool = True
    """On a CPU, run the forward passes on fewer intra-op threads while other processes
    take a share of a core, and on all of them again when they leave
    (``saelib.threads.ThreadGovernor``; one process, not torchrun ranks). The embedded
    model's stores come out bit for bit the same on one and on two threads
    (tests/test_harvest.py); PyTorch does not promise that for every model and batch
    (see ``saelib.threads.follow_load``)."""

    def __post_init__(self):
        if not self.hooks:
            raise ValueError("no hooks to harvest: name at least one, e.g. --hooks blocks.1.hook_resid_post")
        if self.batch_size <= 0 or not self.shard_mb > 0:
            raise ValueError(f"batch_size ({self.batch_size}) and shard_mb ({self.shard_mb}) must be positive")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"dtype {self.dtype!r}: use float16 or float32")


def model_label(model) -> str:
    """The name a store records for ``model``: ``"embedded"`` or the TransformerLens name."""
    name = model.cfg.model_name
    return "embedded" if name == "saelib-embedded" else name


def default_store_root(model) -> Path:
    return artifacts_dir() / "stores" / model_label(model)


def harvest_sample(model, hooks: list[str], n_tokens: int, context_len: int = 128, seed: int = 0,
                   split: str = "train", **config) -> dict[str, ActivationStore]:
    """Harvest ``hooks`` over ``n_tokens`` of the shipped sample text (``saelib.data``) into
    a folder named after what was run, so notebooks asking for the same windows share one
    store and a finished store is opened, not recomputed. ``config``: HarvestConfig fields."""
    from .data import token_windows

    tokens_NL = token_windows(model, n_tokens, context_len=context_len, split=split, seed=seed)
    root = default_store_root(model) / f"{split}_{tokens_NL.numel()}tok_ctx{context_len}_seed{seed}"
    return harvest(model, tokens_NL, HarvestConfig(hooks=list(hooks), out_dir=str(root), **config))


def store_folder(root: str | Path, hook: str) -> Path:
    """One folder per hook point under ``root``."""
    return Path(root) / hook


def stop_layer(model, hooks: list[str]) -> int | None:
    """Blocks to run so every hook fires: the ``stop_at_layer`` argument (None: whole model)."""
    needed = 0
    for hook in hooks:
        layer = hook_layer(hook)
        if layer is None:
            if hook in _EMBEDDING_HOOKS:
                continue
            return None  # e.g. ln_final: needs every block
        needed = max(needed, layer + 1)
    return max(1, needed)


def _capture(model, tokens_BL: torch.Tensor, hooks: list[str], stop: int | None) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}

    def keeper(name: str):
        # Keyed by the name asked for, not hook.name: TransformerBridge calls a hook by its
        # canonical name (blocks.1.hook_out) when it was asked for by an alias (hook_resid_post).
        def keep(act, hook):
            captured[name] = act
        return keep

    model.run_with_hooks(tokens_BL, fwd_hooks=[(h, keeper(h)) for h in hooks], stop_at_layer=stop, return_type=None)
    return captured


def _rows(act: torch.Tensor, first_position: int) -> torch.Tensor:
    """[batch, pos, ...] -> [batch, pos - first_position, d] with head axes flattened: a view,
    its rows in store order along the first two axes (the writer's cast makes the one copy)."""
    return act[:, first_position:].flatten(2)


@torch.inference_mode()
def harvest(model, tokens_NL: torch.Tensor, cfg: HarvestConfig, model_name: str | None = None,
            group: Group | None = None) -> dict[str, ActivationStore]:
    """Run ``model`` over ``tokens_NL`` [n_contexts, context_len] and store every hook's
    activations; returns ``{hook: ActivationStore}``. Resumes stores a killed run left.
    ``group``: the ranks sharing the work (default: torch.distributed's, if initialised);
    every rank passes the same tokens and config."""
    group = group or Group.current()
    hooks = [check_hook_name(model, h) for h in dict.fromkeys(cfg.hooks)]
    if tokens_NL.ndim != 2:
        raise ValueError(f"tokens must be [n_contexts, context_len], got shape {tuple(tokens_NL.shape)}")
    n_contexts, context_len = tokens_NL.shape
    if context_len > model.cfg.n_ctx:
        raise ValueError(f"contexts of {context_len} tokens are longer than the model's n_ctx {model.cfg.n_ctx}: "
                         f"use a context length of {model.cfg.n_ctx} or less")
    if len(tokens_NL) and (int(tokens_NL.min()) < 0 or int(tokens_NL.max()) >= model.cfg.d_vocab):
        raise ValueError(f"token ids run from {int(tokens_NL.min())} to {int(tokens_NL.max())}, outside the model's "
                         f"vocabulary 0..{model.cfg.d_vocab - 1}: they come from another tokenizer")
    first_position = 1 if cfg.skip_bos else 0
    if context_len <= first_position:
        raise ValueError("contexts must hold at least one token besides BOS")
    root = Path(cfg.out_dir) if cfg.out_dir else default_store_root(model)
    stop = stop_layer(model, hooks)
    device = model.cfg.device
    # One short pass tells each hook's width.
    probe = _capture(model, tokens_NL[:1, : first_position + 1].to(device), hooks, stop)
    fingerprint, signature = model_fingerprint(model), model_signature(model)
    itemsize = np.dtype(cfg.dtype).itemsize
    writers, manifests = {}, {}
    for hook in hooks:
        d_in = _rows(probe[hook], first_position).shape[-1]
        manifest = StoreManifest(
            model=model_name or model_label(model),
            model_fingerprint=fingerprint,
            model_signature=signature,
            hook=hook,
            d_in=d_in,
            dtype=cfg.dtype,
            shard_rows=max(1, int(cfg.shard_mb * 2**20 // (d_in * itemsize))),
            context_len=context_len,
            n_contexts=n_contexts,
            first_position=first_position,
            contexts_sha256="",
            special_token_ids=special_token_ids(model),
        )
        if group.world == 1:
            writers[hook] = StoreWriter(store_folder(root, hook), manifest, tokens_NL.numpy(), overwrite=cfg.overwrite)
        else:
            manifests[hook] = manifest


    if group.world > 1:
        return _harvest_block(model, tokens_NL, cfg, hooks, manifests, root, stop, first_position, group)
    rows_per_context = context_len - first_position
    # Resume from the least advanced store; stores further ahead drop rows they already hold.
    start = min(w.start_row for w in writers.values()) // rows_per_context
    for writer in writers.values():
        writer.seek(start * rows_per_context)
    bar = tqdm(
        total=n_contexts * context_len,
        initial=start * context_len,
        unit="tok",
        unit_scale=True,
        desc=f"harvest {len(hooks)} hook{'s' * (len(hooks) > 1)}",
        disable=not cfg.progress,
    )
    # beside a busy process two threads harvested 4.0k tok/s and one 14.6k (quiet: 27.9k)
    try:
        with follow_load(cfg.adapt_threads, device) as load:
            for lo in range(start, n_contexts, cfg.batch_size):
                batch = tokens_NL[lo : lo + cfg.batch_size].to(device)
                wanted = [h for h, w in writers.items() if w.wants_rows(len(batch) * rows_per_context)]
                captured = _capture(model, batch, wanted, stop) if wanted else {}
                for hook, writer in writers.items():
                    if hook in captured:
                        writer.append(_rows(captured[hook], first_position))
                    else:
                        writer.seek(writer.next_row + len(batch) * rows_per_context)
                bar.update(batch.numel())
                load.lap()
    except BaseException:  # an interrupt too: shards already written stay, the next call resumes
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()
    return {hook: writer.close() for hook, writer in writers.items()}


def _harvest_block(model, tokens_NL, cfg: HarvestConfig, hooks, new_manifests: dict, root: Path, stop,
                   first_position: int, group: Group) -> dict[str, ActivationStore]:
    """This rank's share of a several-rank harvest: rank r writes shards r/W .. (r+1)/W of
    each store (as counts of shards), running the same forward batches one process runs
    over the contexts those rows come from; then rank 0 lists every shard in the manifests
    (``assemble_store``). Rank 0 alone opens the folders (lock, fresh start or resume checks)."""
    contexts_sha = hashlib.sha256(np.ascontiguousarray(tokens_NL.numpy(), dtype=np.int32).tobytes()).hexdigest()
    group.require_same("harvests", {"hooks": hooks, "contexts_sha256": contexts_sha, "model": next(iter(new_manifests.values())).model_fingerprint,
                                    **{k: v for k, v in vars(cfg).items() if k not in ("progress", "hooks", "adapt_threads")}})
    folders = {hook: store_folder(root, hook) for hook in hooks}
    opened, problem = {}, None
    if group.is_main:
        try:
            for hook in hooks:
                opened[hook] = StoreWriter(folders[hook], new_manifests[hook], tokens_NL.numpy(), overwrite=cfg.overwrite)
        except Exception as err:
            for writer in opened.values():
                writer.abort()
            problem = err
    refusal = group.broadcast_object(None if problem is None else f"{type(problem).__name__}: {problem}")
    if problem is not None:
        raise problem
    if refusal is not None:
        raise StoreError(f"rank {group.rank} of {group.world}: rank 0 could not open the stores ({refusal})")
    manifests = {hook: StoreManifest.from_json((folders[hook] / "manifest.json").read_text()) for hook in hooks}
    writers = {}
    for hook, manifest in manifests.items():
        n = shard_count(manifest)
        first, stop_shard = n * group.rank // group.world, n * (group.rank + 1) // group.world
        writers[hook] = ShardBlockWriter(folders[hook], manifest, first, stop_shard, finished_shards(folders[hook], manifest))
    rows_per_context = tokens_NL.shape[1] - first_position
    todo = [w for w in writers.values() if w.wants(w.lo, w.hi)]
    # On the one-process batch grid, so every forward batch is one that run computes.
    first_context = min((w.lo // rows_per_context for w in todo), default=0) // cfg.batch_size * cfg.batch_size
    last_context = max((-(-w.hi // rows_per_context) for w in todo), default=0)
    bar = tqdm(total=(last_context - first_context) * tokens_NL.shape[1], unit="tok", unit_scale=True,
               desc=f"harvest {len(hooks)} hook{'s' * (len(hooks) > 1)}, rank {group.rank} of {group.world}",
               disable=not (cfg.progress and group.is_main))
    device = model.cfg.device
    try:
        for lo in range(first_context, last_context, cfg.batch_size):
            batch = tokens_NL[lo : lo + cfg.batch_size]
            row_lo, row_hi = lo * rows_per_context, (lo + len(batch)) * rows_per_context
            wanted = [h for h, w in writers.items() if w.wants(row_lo, row_hi)]
            captured = _capture(model, batch.to(device), wanted, stop) if wanted else {}
            for hook, writer in writers.items():
                if hook in captured:
                    writer.append(_rows(captured[hook], first_position), row_lo)
                else:
                    writer.advance(row_hi)
            bar.update(batch.numel())
    except BaseException:  # shards already written stay (with their records): a rerun resumes
        for writer in opened.values():
            writer.abort()
        raise
    finally:
        bar.close()
    group.barrier()  # every shard is on disk
    if group.is_main:
        try:
            for hook in hooks:
                assemble_store(folders[hook], manifests[hook])
        finally:
            for writer in opened.values():
                writer.abort()  # releases the folder's lock; nothing of its own is buffered
    group.barrier()  # the manifests are final
    return {hook: ActivationStore(folders[hook], verify="size") for hook in hooks}
