"""Reading a store for training: how the work of one process splits over distributed ranks.

    python benchmarks/bench_store_read.py STORE_FOLDER [--ranks 2 4] [--batch-size 4096] [--batches 200]

Every rank of a ``torchrun`` training job works out the same global batches from row
numbers alone (``ActivationStore.iter_batch_rows``) and reads only its own rows of each
(``saelib.train._batches``). This script times that stream for one process and for each
rank of N (run one after another in this process, so the figures are per-rank reading work,
without the machine's other ranks competing), on the same ``--batches`` global batches,
and prints rows and MB read per rank, seconds, and the share of the one-process time.
Run it twice: the first pass also pays for reading the files into the page cache and for
the shards' sha256 checks.
"""

from __future__ import annotations

import argparse
import itertools
import time

from saelib.distributed import Group
from saelib.store import ActivationStore
from saelib.train import TrainConfig, _batches


def time_stream(folder: str, group: Group, cfg: TrainConfig, batches: int) -> tuple[float, int]:
    """(seconds, rows read) for ``batches`` steps of ``group.rank``'s stream."""
    store = ActivationStore(folder)
    store.verify()  # checksums are not reading for training: keep them out of the clock
    started, rows = time.perf_counter(), 0
    for (batch,) in itertools.islice(_batches([store], cfg, group), batches):
        rows += len(batch.local_BD)
    return time.perf_counter() - started, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store", help="an activation store folder (one hook)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    store = ActivationStore(args.store)
    cfg = TrainConfig(batch_size=args.batch_size, total_tokens=args.batch_size * args.batches)
    row_mb = store.d_in * 4 / 1e6  # float32 rows handed to the trainer
    print(f"{store}\n{args.batches} global batches of {args.batch_size} rows")
    print(f"{'ranks':>5s} {'rank':>4s} {'rows read':>10s} {'MB':>8s} {'seconds':>8s} {'share of 1 process':>19s}")
    alone, rows = time_stream(args.store, Group.single(), cfg, args.batches)
    print(f"{1:5d} {0:4d} {rows:10d} {rows * row_mb:8.0f} {alone:8.2f} {1:19.2f}")
    for world in args.ranks:
        for rank in range(world):
            seconds, rows = time_stream(args.store, Group(rank, world), cfg, args.batches)
            print(f"{world:5d} {rank:4d} {rows:10d} {rows * row_mb:8.0f} {seconds:8.2f} {seconds / alone:19.2f}")


if __name__ == "__main__":
    main()
