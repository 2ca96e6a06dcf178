"""Harvest speed against the bare forward pass, and memory of harvesting and reading.

    python benchmarks/bench_harvest.py [--model embedded] [--tokens 300000] [--repeats 3]
    python benchmarks/bench_harvest.py --under-load --tokens 150000 --repeats 2

For each hook set, the bare forward pass (``model(tokens, stop_at_layer=...)``, no hooks,
no disk) and ``saelib.harvest`` over the same tokens run alternately ``--repeats`` times
in this one process; the best time of each is compared, so background load affects both
alike. Target (DESIGN.md): harvesting at >= 90% of the bare forward pass's tokens/s.
Peak RSS is read from /proc (reset between phases), so reading a store can be shown to
take memory set by the shuffle buffer, not by the store's size.

``--under-load`` harvests the three-hook set (residual, MLP out, MLP hidden) with the thread
governor on (``HarvestConfig.adapt_threads``, the default) and off, first on the quiet
machine, then while a competing process (a busy loop pinned to core 0, started and stopped
by the benchmark) takes one core, and prints each loaded speed as a share of its quiet
speed (the ideal with one of two cores taken is 50%).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import torch

from competitor import competing_process
from saelib.data import token_windows
from saelib.harvest import HarvestConfig, harvest, stop_layer
from saelib.models import load_model


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the VmHWM high-water mark
    except OSError:
        pass


@torch.inference_mode()
def bare_forward_seconds(model, tokens_NL, hooks, batch_size) -> float:
    stop = stop_layer(model, hooks)
    started = time.perf_counter()
    for lo in range(0, len(tokens_NL), batch_size):
        model(tokens_NL[lo : lo + batch_size], stop_at_layer=stop, return_type=None)
    return time.perf_counter() - started


def harvest_seconds(model, tokens_NL, hooks, batch_size, folder, adapt_threads: bool = True) -> float:
    # Into an empty folder: deleting the last repeat's store (overwrite=True) took 0.1 s of a
    # 5 s harvest of 460 MB, a cost of the benchmark's repeats, not of harvesting.
    shutil.rmtree(folder, ignore_errors=True)
    cfg = HarvestConfig(hooks=hooks, batch_size=batch_size, out_dir=str(folder), progress=False,
                        adapt_threads=adapt_threads)
    started = time.perf_counter()
    harvest(model, tokens_NL, cfg)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--under-load", action="store_true",
                        help="harvest three hooks quiet, then beside a busy process pinned to core 0, governor on and off")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model, device="cpu")
    tokens_NL = token_windows(model, args.tokens)
    n_tokens = tokens_NL.numel()
    L = model.cfg.n_layers
    mid = L // 2
    hook_sets = {
        "1 residual": [f"blocks.{mid}.hook_resid_post"],
        f"{L} residuals": [f"blocks.{i}.hook_resid_post" for i in range(L)],
        "residual + MLP out + MLP hidden": [
            f"blocks.{mid}.hook_resid_post",
            f"blocks.{mid}.hook_mlp_out",
            f"blocks.{mid}.mlp.hook_post",
        ],
    }
    root = Path(tempfile.mkdtemp(prefix="bench_harvest_"))
    if args.under_load:
        try:
            under_load(model, tokens_NL, hook_sets["residual + MLP out + MLP hidden"], args, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    print(f"model {args.model}, {n_tokens} tokens in {len(tokens_NL)} contexts, batch {args.batch_size}, "
          f"{args.threads} threads, best of {args.repeats}")
    print(f"{'hooks':34s} {'bare tok/s':>11s} {'harvest tok/s':>14s} {'ratio':>6s} {'MB written':>11s} {'peak RSS MiB':>13s}")
    try:
        bare_forward_seconds(model, tokens_NL[: args.batch_size], ["blocks.0.hook_resid_post"], args.batch_size)  # warm-up
        for label, hooks in hook_sets.items():
            folder = root / label.replace(" ", "_")
            bare, harvested = [], []
            reset_peak_rss()
            for _ in range(args.repeats):
                bare.append(bare_forward_seconds(model, tokens_NL, hooks, args.batch_size))
                harvested.append(harvest_seconds(model, tokens_NL, hooks, args.batch_size, folder))
            peak = rss_mib("VmHWM")
            written = sum(f.stat().st_size for f in folder.rglob("*.npy")) / 1e6
            ratio = min(bare) / min(harvested)
            print(f"{label:34s} {n_tokens / min(bare):11.0f} {n_tokens / min(harvested):14.0f} {ratio:6.2f} {written:11.0f} {peak:13.0f}")

        # Reading: peak RSS while streaming shuffled batches through the largest store.
        from saelib.store import ActivationStore

        store = ActivationStore(max((m.parent for m in root.rglob("manifest.json")), key=lambda f: ActivationStore(f).d_in))
        size_mb = sum(f.stat().st_size for f in store.folder.glob("shard_*.npy")) / 1e6
        for buffer_rows in (1 << 14, 1 << 16):
            reset_peak_rss()
            before = rss_mib()
            started = time.perf_counter()
            rows = sum(len(b) for b in store.iter_batches(4096, buffer_rows=buffer_rows))
            seconds = time.perf_counter() - started
            print(f"read {store.hook} ({size_mb:.0f} MB on disk), shuffle buffer {buffer_rows} rows "
                  f"({buffer_rows * store.d_in * 4 / 2**20:.0f} MiB): {rows / seconds:,.0f} rows/s, "
                  f"peak RSS +{rss_mib('VmHWM') - before:.0f} MiB over the {before:.0f} MiB before")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def under_load(model, tokens_NL, hooks, args, root) -> None:
    """``--under-load``: the best of ``--repeats`` harvests per setting, quiet and loaded."""
    rates = {}
    for loaded in (False, True):
        with competing_process(core=0) if loaded else contextlib.nullcontext():
            for adapt in (True, False):
                seconds = min(harvest_seconds(model, tokens_NL, hooks, args.batch_size, root / "store", adapt)
                              for _ in range(args.repeats))
                rates[loaded, adapt] = tokens_NL.numel() / seconds
    print(f"model {args.model}, {tokens_NL.numel()} tokens, hooks {', '.join(hooks)}, {args.threads} threads, "
          f"best of {args.repeats}")
    print(f"{'thread governor':16s} {'quiet tok/s':>12s} {'loaded tok/s':>13s} {'share':>6s}")
    for adapt in (True, False):
        quiet, loaded = rates[False, adapt], rates[True, adapt]
        print(f"{'on' if adapt else 'off (fixed)':16s} {quiet:12.0f} {loaded:13.0f} {loaded / quiet:6.0%}")


if __name__ == "__main__":
    main()
