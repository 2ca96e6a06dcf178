"""SAE training speed: saelib's TopK and ReLU against plain dense PyTorch and SAELens.

    python benchmarks/bench_train.py [--steps 12] [--threads 2] [--shapes 256,4096,32 512,16384,64]
    PYTHONPATH=/path/to/sae_lens/site python benchmarks/bench_train.py   # adds SAELens rows
    python benchmarks/bench_train.py --under-load --steps 60   # quiet, then beside a busy process
    python benchmarks/bench_train.py --bf16                     # adds TopK with fp32 and bf16 selection matmuls
    python benchmarks/bench_train.py --ddp 2 --steps 30         # 2 torchrun (gloo) ranks vs 1 process
    python benchmarks/bench_train.py --profile --steps 10       # where a saelib TopK step's time goes

``--profile`` trains saelib's TopK at each shape for a few warm-up steps, then runs
``--steps`` more steps under ``torch.profiler`` and prints each op's self time per step,
grouped into the parts of a step (encoder matmul, top-k, sparse products, ...), beside
the plain matmul of the encoder's shape timed in the same run. AuxK's pick runs only on
steps with dead latents: set ``--dead-fraction`` to mark that share dead throughout.

``--ddp N`` trains saelib's TopK at each shape three ways on the same global batches: one
process on ``--threads`` threads, one process on ``--threads / N`` threads, and ``N``
ranks under ``torchrun`` (gloo) with ``--threads / N`` threads each; it prints tokens/s,
the speed-up over each single process, and the final FVU of each (equal up to float
summation order, since the ranks take one process's steps).

``--under-load`` runs every trainer twice: on the quiet machine, then while a competing
process (a busy loop pinned to core 0, started and stopped by the benchmark) takes one core,
and prints each trainer's loaded speed as a share of its quiet speed. With one of two cores
taken the ideal is 50%. saelib's trainer adapts its thread count to the load
(``saelib.threads``); it needs a few dozen steps to notice, hence more ``--steps``.

For each shape (d_in, d_sae, k) every trainer runs the same number of steps on the same
batches (batch 4096), in this one process, so the ratios are fair under background load:

- ``saelib topk``: ``saelib.train`` (sparse decoder and sparse weight gradients, AuxK on)
- ``dense topk``: the same TopK loss in plain PyTorch autograd (dense decoder and grads)
- ``sae_lens topk``: SAELens's ``SAETrainer`` with a ``TopKTrainingSAE`` at its defaults,
  when ``sae_lens`` can be imported
- ``saelib relu``: ``saelib.train`` with an L1 penalty (dense, as ReLU latents are)
- with ``--bf16``: ``saelib fp32`` and ``saelib bf16``, saelib's TopK with the selection
  matmul forced to each precision (``saelib topk`` is ``encoder_dtype="auto"``, whose pick
  is printed per shape)

Data: a fixed pool of toy vectors (``saelib.toy``, 4 x d_in ground-truth features) cycled
in the same order for every trainer, so FVU after the same tokens is comparable. Each
row prints tokens/s, FVU on held-out vectors after training, the ratio to SAELens (else
to dense), and achieved FLOP/s against the fastest plain matmul measured in this run
("of matmul": bf16's where ``--bf16`` measured a faster one) and against fp32's. FLOPs
are counted as the work each method must do: a dense step is 6 * B * d_in * d_sae
(encoder forward, decoder forward, two weight gradients... counted once each as 2*B*D*F,
the input gradient not needed); a sparse TopK step is the dense encoder forward 2*B*D*F
plus 8 * B * k * d_in for the sparse decoder and gradients.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

import torch

from competitor import competing_process
from saelib.precision import bf16_speedup, cpu_has_bf16_matmul, resolve_encoder_dtype
from saelib.sae import SAEConfig, init_tied_, make_sae
from saelib.toy import ToyConfig, ToyData
from saelib.train import TrainConfig, train_sae

BATCH = 4096


def matmul_flops(d_in: int, d_sae: int, repeats: int = 5, dtype=torch.float32) -> float:
    """FLOP/s of the plain [BATCH, d_in] @ [d_in, d_sae] product: into one output buffer (as
    the trainer's blocks are), best of ``repeats`` after two warm-ups. A fresh output per
    product (32-64 MiB, above glibc's mmap threshold) is page-faulted in every time, which
    read 1.7-4x below the product itself on issue 20's Xeon (bf16 720-1,200 GFLOP/s against
    2,900) and made every "share of matmul" look better than it is."""
    a, w = torch.randn(BATCH, d_in, dtype=dtype), torch.randn(d_in, d_sae, dtype=dtype)
    out = torch.empty(BATCH, d_sae, dtype=dtype)
    for _ in range(2):
        torch.mm(a, w, out=out)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, w, out=out)
        best = min(best, time.perf_counter() - started)
    return 2 * BATCH * d_in * d_sae / best


def fvu(reconstruct, x_ND: torch.Tensor) -> float:
    with torch.no_grad():
        err = (reconstruct(x_ND) - x_ND).pow(2).sum()
        return float(err / (x_ND - x_ND.mean(0)).pow(2).sum())


def run_saelib(pool, steps, d_in, d_sae, k, architecture, adapt_threads=True, encoder_dtype="auto"):
    # Notebook 03's settings; warm-up scaled to the short run so most steps use the peak lr.
    relu = architecture == "relu"
    cfg = TrainConfig(total_tokens=steps * BATCH, batch_size=BATCH, lr=4e-3 if relu else 1e-3, progress=False,
                      lr_warmup_steps=max(1, steps // 10), l1_coefficient=0.1 if relu else 0.0,
                      l1_warmup_steps=max(1, steps // 4) if relu else 0, dead_tokens=2 * BATCH,
                      adapt_threads=adapt_threads, encoder_dtype=encoder_dtype)
    batches = lambda: itertools.islice(itertools.cycle(pool), steps)  # noqa: E731
    started = time.perf_counter()
    result = train_sae(SAEConfig(d_in, d_sae, architecture, k=k), batches, cfg)
    return time.perf_counter() - started, lambda x: result.sae(x).recon_BD


def run_dense_topk(pool, steps, d_in, d_sae, k):
    """The TopK SAE in plain autograd: what a straightforward implementation costs."""
    # saelib's tied initialisation (seed 0), so both start from the same atoms. A plain
    # torch.manual_seed(0) draw would replay the toy data's own seed-0 draw: the first
    # 4 x d_in atoms would *be* the ground-truth features, a head start no real run has.
    start = make_sae(SAEConfig(d_in, d_sae, "topk", k=k))
    init_tied_(start, seed=0)
    W_dec = start.W_dec.detach().clone().requires_grad_()
    W_enc = start.W_enc.detach().contiguous().clone().requires_grad_()  # a plain [d_in, d_sae] tensor
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = pool[0].mean(0).clone().requires_grad_()
    params = [W_enc, b_enc, W_dec, b_dec]
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def forward(x):
        pre = (x - b_dec) @ W_enc + b_enc
        values, indices = pre.topk(k, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        return latents @ W_dec + b_dec

    started = time.perf_counter()
    with torch.enable_grad():
        for x in itertools.islice(itertools.cycle(pool), steps):
            loss = (forward(x) - x).pow(2).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                W_dec /= W_dec.norm(dim=1, keepdim=True)
    return time.perf_counter() - started, forward


def run_saelens_topk(pool, steps, d_in, d_sae, k):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    # lr and lr_end as the LLM runner would fill them in (its defaults: 3e-4, lr / 10).
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=3e-4, lr_end=3e-5)
    trainer = SAETrainer(trainer_cfg,
                         sae, data_provider=itertools.cycle(pool))
    started = time.perf_counter()
    trained = trainer.fit()
    seconds = time.perf_counter() - started
    return seconds, lambda x: trained.decode(trained.encode(x))


def measure(args, have_saelens: bool) -> dict:
    """{(shape, trainer): (tokens/s, FVU, GFLOP/s, share of matmul)}, printing the table."""
    out = {}
    header = (f"{'shape':>16s} {'trainer':>14s} {'tok/s':>8s} {'FVU':>6s} {'vs ref':>7s} {'GFLOP/s':>8s} {'of matmul':>9s}"
              f" {'of fp32 mm':>10s}")
    for shape in args.shapes:
        d_in, d_sae, k = (int(v) for v in shape.split(","))
        pool, held_out = toy_pool(d_in, k, args.steps)
        peak = peak_fp32 = matmul_flops(d_in, d_sae)
        print(f"\nd_in {d_in}, d_sae {d_sae}, k {k}: plain fp32 matmul {peak / 1e9:.0f} GFLOP/s")
        speedup = bf16_speedup("cpu", d_in, d_sae)
        auto = resolve_encoder_dtype("auto", "cpu", d_in, d_sae)
        print("bf16 selection matmul: " + (f"{speedup:.2f}x fp32" if speedup else "no bf16 instructions on this CPU (not tried)")
              + f"; encoder_dtype='auto' picks {str(auto).removeprefix('torch.')}")
        if args.bf16:  # the roofline is the fastest matmul the run used
            # a few repeats where bf16 has a hardware path; one where it is emulated (seconds each)
            peak_bf16 = matmul_flops(d_in, d_sae, repeats=5 if speedup else 1, dtype=torch.bfloat16)
            print(f"plain bf16 matmul {peak_bf16 / 1e9:.1f} GFLOP/s")
            peak = max(peak, peak_bf16)
        print(header)
        runs = {
            "saelib topk": lambda: run_saelib(pool, args.steps, d_in, d_sae, k, "topk"),
            "dense topk": lambda: run_dense_topk(pool, args.steps, d_in, d_sae, k),
            "saelib relu": lambda: run_saelib(pool, args.steps, d_in, d_sae, k, "relu"),
        }
        if args.under_load:  # the same trainer with the thread count held fixed, as before saelib.threads
            runs["saelib fixed"] = lambda: run_saelib(pool, args.steps, d_in, d_sae, k, "topk", adapt_threads=False)
        if args.bf16:  # both precisions forced, beside "saelib topk" (encoder_dtype="auto", printed above)
            runs["saelib fp32"] = lambda: run_saelib(pool, args.steps, d_in, d_sae, k, "topk", encoder_dtype="float32")
            runs["saelib bf16"] = lambda: run_saelib(pool, args.steps, d_in, d_sae, k, "topk", encoder_dtype="bfloat16")
        if have_saelens:
            runs["sae_lens topk"] = lambda: run_saelens_topk(pool, args.steps, d_in, d_sae, k)
        results = {name: run() for name, run in runs.items()}
        reference = "sae_lens topk" if have_saelens else "dense topk"
        ref_rate = args.steps * BATCH / results[reference][0]
        dense_flops = 6 * BATCH * d_in * d_sae
        sparse_flops = 2 * BATCH * d_in * d_sae + 8 * BATCH * k * d_in
        for name, (seconds, reconstruct) in results.items():
            rate = args.steps * BATCH / seconds
            flops = (sparse_flops if name in ("saelib topk", "saelib fixed", "saelib fp32", "saelib bf16") else dense_flops) * args.steps / seconds
            error = fvu(reconstruct, held_out)
            print(f"{shape:>16s} {name:>14s} {rate:8.0f} {error:6.3f} {rate / ref_rate:6.2f}x "
                  f"{flops / 1e9:8.1f} {flops / peak:8.0%} {flops / peak_fp32:10.0%}")
            out[shape, name] = (rate, error, flops / 1e9, flops / peak)
    return out


def toy_pool(d_in: int, k: int, steps: int):
    """(pool of training batches, held-out batch) of the toy data for one shape."""
    toy = ToyData(ToyConfig(d=d_in, n_features=4 * d_in, avg_active=2 * k, decay=0.999))
    generator = torch.Generator().manual_seed(0)
    pool = [toy.sample(BATCH, generator)[0] for _ in range(min(steps, 8))]
    return pool, toy.sample(BATCH, generator)[0]


# The parts of a TopK step, by the ops that make them up as torch.profiler names them. Each
# op's self time goes to the part of its nearest enclosing op (itself included) named here,
# so e.g. the bias copy inside ``addmm`` counts as matmul and a sort inside a sparse product
# as a sort.
STEP_PARTS = {
    "dense matmuls (addmm, mm)": ("aten::addmm", "aten::mm"),
    "top-k selection": ("aten::topk", "saelib.top_k_rows"),
    "sorts (the code's CSR layout)": ("aten::sort", "aten::argsort"),
    "sparse products": ("aten::_sparse", "aten::sparse", "aten::embedding_bag", "aten::_embedding_bag",
                        "aten::index_add"),
    "Adam": ("Optimizer.step",),
}


def step_part(event) -> str:
    """The part of a step (a STEP_PARTS key) an op's self time belongs to."""
    while event is not None:
        part = next((name for name, prefixes in STEP_PARTS.items() if event.name.startswith(prefixes)), None)
        if part:
            return part
        event = event.cpu_parent
    return "everything else"


def profile_step(args) -> None:
    """``--profile``: self time per step of each part of a saelib TopK step, per shape."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import saelib.sae
    from saelib.train import SAETrainer

    top_k_rows = saelib.sae.top_k_rows

    def labelled_top_k_rows(pre_BF, k):  # its ranking of group maxima and gathers count as top-k too
        with record_function("saelib.top_k_rows"):
            return top_k_rows(pre_BF, k)

    saelib.sae.top_k_rows = labelled_top_k_rows

    for shape in args.shapes:
        d_in, d_sae, k = (int(v) for v in shape.split(","))
        pool, _ = toy_pool(d_in, k, args.steps)
        cfg = TrainConfig(total_tokens=(args.steps + 4) * BATCH, batch_size=BATCH, progress=False,
                          adapt_threads=False, dead_tokens=2 * BATCH)
        trainer = SAETrainer(make_sae(SAEConfig(d_in, d_sae, "topk", k=k)), cfg)
        trainer.fit(lambda: iter(pool), max_steps=3)  # initialisation and warm-up
        batches = [x * trainer.input_scale for x in pool]
        dead = int(args.dead_fraction * d_sae)

        def steps():
            for step in range(args.steps):
                if dead:  # these latents count as dead, so AuxK picks among them
                    trainer.tokens_since_fired[:dead] = cfg.resolved_dead_tokens()
                trainer.train_step(batches[step % len(batches)])

        steps()  # warm
        started = time.perf_counter()
        steps()
        wall_ms = (time.perf_counter() - started) * 1e3 / args.steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps()
        parts = {name: 0.0 for name in STEP_PARTS} | {"everything else": 0.0}
        for event in prof.events():
            parts[step_part(event)] += event.self_cpu_time_total / 1e3 / args.steps
        per_step = {e.key: e.self_cpu_time_total / 1e3 / args.steps for e in prof.key_averages()}
        total = sum(parts.values())
        matmul_ms = 2 * BATCH * d_in * d_sae / matmul_flops(d_in, d_sae) * 1e3
        print(f"\n{shape}: {wall_ms:.1f} ms per step unprofiled ({BATCH * 1e3 / wall_ms:.0f} tok/s), "
              f"{total:.1f} ms of profiled self time; a plain matmul of the encoder's shape takes {matmul_ms:.1f} ms")
        print(f"{'part':>32s} {'ms/step':>8s} {'share':>6s}")
        for name, ms in parts.items():
            print(f"{name:>32s} {ms:8.1f} {ms / total:6.0%}")
        print("largest ops (self time):")
        for key, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:12]:
            print(f"{key:>40s} {ms:8.2f} ms")
        print_ceiling(trainer, d_in, d_sae)


def best_ms(work, repeats: int = 5) -> float:
    """Best wall time of ``work()`` over ``repeats`` calls after one warm-up, in ms."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def print_ceiling(trainer, d_in: int, d_sae: int) -> None:
    """The highest "share of matmul" any trainer of this SAE with Adam could reach here.
    Besides the encoder's matmul, a step must at least update every weight (the
    optimiser's step over all of them, timed alone on the trainer's own parameters and
    gradients) and, unless the top-k is fused into the matmul, read its output once (timed
    as torch's fastest pass over the [batch, d_sae] pre-activations, a whole-tensor max:
    the row-wise ``amax`` a top-k would start from took 1-3x as long on issue 20's Xeon).
    The ceiling is the matmul's time over the sum; the target of 80% needs everything else
    within a quarter of it."""
    # bf16 only where the CPU has a path for it: emulated, one product took 28.6 s (AMD EPYC)
    dtypes = (torch.float32, torch.bfloat16) if cpu_has_bf16_matmul() else (torch.float32,)
    flops = {dtype: matmul_flops(d_in, d_sae, dtype=dtype) for dtype in dtypes}
    fastest = max(flops, key=flops.get)
    matmul_ms = 2 * BATCH * d_in * d_sae / flops[fastest] * 1e3
    optimiser_ms = best_ms(trainer.optimizer.step)
    pre_BF = torch.randn(BATCH, d_sae).to(fastest)
    read_ms = best_ms(pre_BF.max)
    print(f"ceiling: {str(fastest).removeprefix('torch.')} matmul {matmul_ms:.1f} ms, Adam step over every weight "
          f"{optimiser_ms:.1f} ms, one read of the pre-activations {read_ms:.1f} ms: at most "
          f"{matmul_ms / (matmul_ms + optimiser_ms):.0%} of matmul with the top-k fused into it, "
          f"{matmul_ms / (matmul_ms + optimiser_ms + read_ms):.0%} without")


def ddp_worker(shape: str, steps: int) -> None:
    """One rank of ``--ddp``: train saelib TopK, rank 0 prints seconds and FVU as JSON."""
    from saelib.distributed import init_from_env

    group = init_from_env("cpu")
    d_in, d_sae, k = (int(v) for v in shape.split(","))
    pool, held_out = toy_pool(d_in, k, steps)
    group.barrier()  # start the clock together
    seconds, reconstruct = run_saelib(pool, steps, d_in, d_sae, k, "topk")
    if group.is_main:
        print("RESULT " + json.dumps({"seconds": seconds, "fvu": fvu(reconstruct, held_out)}), flush=True)
    torch.distributed.destroy_process_group()


def measure_ddp(args) -> None:
    """``--ddp N``: N gloo ranks against one process, per shape."""
    ranks = args.ddp
    per_rank = max(1, args.threads // ranks)
    print(f"\n== {ranks} torchrun ranks (gloo, {per_rank} thread{'s' * (per_rank > 1)} each) vs one process ==")
    print(f"{'shape':>16s} {'run':>22s} {'tok/s':>8s} {'FVU':>6s} {'speed-up':>9s}")
    for shape in args.shapes:
        d_in, d_sae, k = (int(v) for v in shape.split(","))
        pool, held_out = toy_pool(d_in, k, args.steps)
        rows = {}
        for threads in sorted({args.threads, per_rank}, reverse=True):
            torch.set_num_threads(threads)
            seconds, reconstruct = run_saelib(pool, args.steps, d_in, d_sae, k, "topk")
            rows[f"1 process, {threads} thread{'s' * (threads > 1)}"] = (seconds, fvu(reconstruct, held_out))
        torch.set_num_threads(args.threads)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                   __file__, "--ddp-worker", shape, "--steps", str(args.steps)]
        run = subprocess.run(command, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": str(per_rank)})
        result = next((json.loads(line[7:]) for line in run.stdout.splitlines() if line.startswith("RESULT ")), None)
        if result is None:
            sys.exit(f"the {ranks}-rank run failed:\n{run.stderr[-2000:]}")
        rows[f"{ranks} ranks x {per_rank} thread{'s' * (per_rank > 1)}"] = (result["seconds"], result["fvu"])
        single = rows[f"1 process, {args.threads} thread{'s' * (args.threads > 1)}"][0]
        for name, (seconds, error) in rows.items():
            print(f"{shape:>16s} {name:>22s} {args.steps * BATCH / seconds:8.0f} {error:6.3f} {single / seconds:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per trainer and shape")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=["256,4096,32", "512,16384,64"], help="d_in,d_sae,k")
    parser.add_argument("--bf16", action="store_true",
                        help="add saelib TopK with encoder_dtype='bfloat16' (emulated, i.e. very slow, without AMX/AVX512-BF16)")
    parser.add_argument("--under-load", action="store_true",
                        help="measure quiet, then beside a busy process pinned to core 0, and print the shares")
    parser.add_argument("--ddp", type=int, metavar="N", help="compare N torchrun ranks (gloo) with one process")
    parser.add_argument("--ddp-worker", metavar="SHAPE", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="profile saelib TopK steps: time per part of a step")
    parser.add_argument("--dead-fraction", type=float, default=0.0,
                        help="with --profile: share of latents held dead, so AuxK's pick runs every step")
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args.steps)
        return
    torch.set_num_threads(args.threads)
    if args.profile:
        profile_step(args)
        return
    if args.ddp:
        measure_ddp(args)
        return
    try:
        import sae_lens  # noqa: F401

        have_saelens = True
    except ImportError:
        have_saelens = False
    print(f"batch {BATCH}, {args.steps} steps each, {args.threads} threads, SAELens "
          f"{'found' if have_saelens else 'not importable: its rows are skipped'}")
    if not args.under_load:
        measure(args, have_saelens)
        return
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("--under-load needs at least 2 cores (one for the competing process)")
    print("\n== quiet ==")
    quiet = measure(args, have_saelens)
    print("\n== beside a busy loop pinned to core 0 ==")
    with competing_process(core=0):
        loaded = measure(args, have_saelens)
    print(f"\n== under load: share of quiet speed (ideal with 1 of {len(os.sched_getaffinity(0))} cores taken: "
          f"{1 - 1 / len(os.sched_getaffinity(0)):.0%}) ==")
    print(f"{'shape':>16s} {'trainer':>14s} {'quiet tok/s':>12s} {'loaded tok/s':>13s} {'share':>6s} {'FVU q/l':>13s}")
    for key, (rate, error, _, _) in quiet.items():
        loaded_rate, loaded_error = loaded[key][0], loaded[key][1]
        print(f"{key[0]:>16s} {key[1]:>14s} {rate:12.0f} {loaded_rate:13.0f} {loaded_rate / rate:6.0%} "
              f"{error:6.3f}/{loaded_error:.3f}")


if __name__ == "__main__":
    main()
