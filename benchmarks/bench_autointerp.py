"""Offline autointerp speed: features explained and scored per second.

    python benchmarks/bench_autointerp.py [--sae PATH] [--tokens 100000] [--features all] [--explainer patterns]

Runs the main SAE of notebook 03 (default profile) over ``--tokens`` of held-out text, as
notebook 06 does (``FeatureActivations.collect``), then explains and scores every live feature (or the first
``--features``) with the offline pattern explainer and simulator at notebook 06's example
sizes, and prints the time of each phase, features per second and the score's mean.
Target (DESIGN.md): all 4096 features of the main SAE in under 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from saelib.autointerp.patterns import KINDS, PatternExplainer, PatternSimulator, Vocabulary
from saelib.autointerp.pipeline import score_features
from saelib.features import FeatureActivations
from saelib.harvest import harvest_sample
from saelib.models import load_model
from saelib.nb import load_results
from saelib.sae_io import load_sae

SIZES = dict(n_explain=10, n_score_top=10, n_bands=10, per_band=2)  # notebook 06's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sae", help="SAE folder (default: notebook 03's main SAE, default profile)")
    parser.add_argument("--tokens", type=int, default=100_000, help="held-out tokens the SAE is run over")
    parser.add_argument("--features", default="all", help="'all' live features, or how many (the first N live ones)")
    parser.add_argument("--explainer", choices=["patterns", "top tokens"], default="patterns")
    args = parser.parse_args()

    trained = load_results("03_train_saes", "embedded") if args.sae is None else None
    sae = load_sae(args.sae or trained["main_sae"])
    model = load_model(sae.cfg.model_name or "embedded")
    store = harvest_sample(model, [sae.cfg.hook_name], args.tokens, split="heldout", seed=0)[sae.cfg.hook_name]

    started = time.perf_counter()
    acts = FeatureActivations.collect(sae, store)
    collect_s = time.perf_counter() - started
    live = np.flatnonzero(np.diff(acts.offsets_F1) > 0)
    features = live if args.features == "all" else live[: int(args.features)]

    vocabulary = Vocabulary.of_tokenizer(model.tokenizer)
    kinds = ("token",) if args.explainer == "top tokens" else KINDS
    started = time.perf_counter()
    scores = score_features(acts, features, PatternExplainer(vocabulary, kinds=kinds), PatternSimulator(vocabulary),
                            progress=True, **SIZES)
    score_s = time.perf_counter() - started

    print(f"SAE {sae.cfg.d_sae} latents ({sae.cfg.architecture}) at {sae.cfg.hook_name}; {acts.n_rows:,} rows")
    print(f"collect activations: {collect_s:6.1f} s")
    print(f"explain + score:     {score_s:6.1f} s for {len(features)} features = {len(features) / score_s:.1f} features/s "
          f"({1000 * score_s / len(features):.1f} ms each)")
    print(f"total:               {collect_s + score_s:6.1f} s (target: all 4096 features < 120 s)")
    print(f"mean correlation {np.nanmean(scores.correlation):.3f}, detection {np.nanmean(scores.detection):.3f}, "
          f"fuzzing {np.nanmean(scores.fuzzing):.3f}; failures {(scores.failure != '').sum()}")


if __name__ == "__main__":
    main()
