"""Peak memory of training from activation stores of growing size.

    python benchmarks/bench_memory.py [--tokens 500000] [--factors 1 4]

For each factor, one fresh process harvests ``factor * tokens`` vectors of the embedded
model's middle residual stream (``harvest_sample``: stores are reused when they exist) and
trains a TopK SAE through the whole store once, then reports its peak resident memory
(VmHWM), split at the end into anonymous memory (RssAnon: tensors, buffers) and file pages
(RssFile: memory-mapped shards the kernel may drop at will). Target (DESIGN.md): training
memory independent of store size. The default ``--tokens`` is notebook 02/03's store.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
from saelib.harvest import harvest_sample
from saelib.models import load_model
from saelib.sae import SAEConfig
from saelib.train import TrainConfig, train_sae

def status():
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields

n_tokens = int(sys.argv[1])
model = load_model("embedded")
hook = f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
store = harvest_sample(model, [hook], n_tokens, seed=0, progress=False)[hook]
del model
Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark: training alone counts
before = status()
started = time.perf_counter()
rows = len(store) // 4096 * 4096
train_sae(SAEConfig(store.d_in, 1024, "topk", k=32), store, TrainConfig(total_tokens=rows, batch_size=4096, progress=False))
after = status()
size_mb = sum(f.stat().st_size for f in store.folder.glob("shard_*.npy")) / 1e6
print(json.dumps({"rows": len(store), "store_mb": size_mb, "seconds": time.perf_counter() - started,
                  "before": before, "after": after}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=500_000, help="the 1x store size (tokens)")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    print(f"{'store':>6s} {'rows':>10s} {'on disk MB':>11s} {'train s':>8s} {'peak RSS MiB':>13s} "
          f"{'RSS before':>11s} {'anon at end':>12s} {'file at end':>12s}")
    for factor in args.factors:
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(factor * args.tokens)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"the {factor}x run failed after {time.perf_counter() - started:.0f} s:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{factor:5d}x {r['rows']:10d} {r['store_mb']:11.0f} {r['seconds']:8.1f} {r['after']['VmHWM']:13.0f} "
              f"{r['before']['VmRSS']:11.0f} {r['after']['RssAnon']:12.0f} {r['after']['RssFile']:12.0f}")


if __name__ == "__main__":
    main()
