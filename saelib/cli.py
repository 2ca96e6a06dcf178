"""``python -m saelib ...``: long jobs from a shell.

    python -m saelib run-notebooks [--profile smoke|default|full] [--only 00 02]
    python -m saelib zoo corpus      # fetch sources, train the tokenizer, tokenize
    python -m saelib zoo train       # train the embedded LM (resumable; re-run to resume)
    python -m saelib zoo export      # copy the trained weights into data/
    python -m saelib zoo card        # measure quality, write data/MODEL_CARD.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cmd_run_notebooks(args) -> int:
    if args.profile:
        os.environ["SAELIB_PROFILE"] = args.profile
    from .report import run_all

    table = run_all(only=args.only, timeout=args.timeout)
    return 0 if bool(table["ok"].all()) else 1


def _cmd_zoo_corpus(args) -> int:
    from .zoo.tokenizer import build_all

    build_all(Path(args.build_dir), vocab_size=args.vocab_size)
    return 0


def _train_config(args):
    from .zoo.train_lm import TrainLMConfig

    build = Path(args.build_dir)
    return TrainLMConfig(
        train_tokens=str(build / "tokens" / "train.bin"),
        val_tokens=str(build / "tokens" / "val.bin"),
        out_dir=str(build / "run"),
        total_tokens=args.total_tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        repeat_share=args.repeat_share,
        random_repeat_share=args.random_repeat_share,
        bf16=not args.fp32,
    )


def _cmd_zoo_train(args) -> int:
    import torch

    from .zoo.train_lm import LMTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    trainer = LMTrainer(_train_config(args))
    step = trainer.run(max_minutes=args.max_minutes, max_steps=args.max_steps)
    print(f"stopped at step {step} of {trainer.cfg.steps()}; checkpoint {trainer.checkpoint_path}")
    return 0


def _cmd_zoo_export(args) -> int:
    from .zoo.export import export_embedded

    export_embedded(Path(args.build_dir))
    return 0


def _cmd_zoo_card(args) -> int:
    from .zoo.quality import write_model_card

    write_model_card(Path(args.build_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m saelib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run-notebooks", help="execute all notebooks, write executed copies and HTML reports")
    run.add_argument("--profile", choices=["smoke", "default", "full"], help="sets SAELIB_PROFILE")
    run.add_argument("--only", nargs="*", help="notebook name prefixes to run (default: all)")
    run.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    run.set_defaults(func=_cmd_run_notebooks)

    zoo = sub.add_parser("zoo", help="build the embedded default model").add_subparsers(dest="step", required=True)
    for name, func, text in [
        ("corpus", _cmd_zoo_corpus, "fetch the pinned sources, train the tokenizer, tokenize"),
        ("train", _cmd_zoo_train, "train (or resume training) the embedded LM"),
        ("export", _cmd_zoo_export, "write the trained weights, config and tokenizer to data/"),
        ("card", _cmd_zoo_card, "measure quality bars and write data/MODEL_CARD.md"),
    ]:
        step = zoo.add_parser(name, help=text)
        step.add_argument("--build-dir", default="build/zoo", help="working folder for corpus, tokens and run")
        step.set_defaults(func=func)
        if name == "corpus":
            step.add_argument("--vocab-size", type=int, default=8192)
        if name == "train":
            step.add_argument("--total-tokens", type=int, default=40_000_000, help="length of the lr schedule")
            step.add_argument("--batch-size", type=int, default=16, help="sequences of n_ctx tokens per step")
            step.add_argument("--lr", type=float, default=1e-3)
            step.add_argument("--repeat-share", type=float, default=0.1, help="rows of text chunk + its copy")
            step.add_argument("--random-repeat-share", type=float, default=0.1, help="rows of random tokens + their copy")
            step.add_argument("--fp32", action="store_true", help="no bfloat16 autocast")
            step.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this long")
            step.add_argument("--max-steps", type=int, help="stop after this many more steps")
            step.add_argument("--threads", type=int, help="torch threads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
