"""``python -m saelib ...``: long jobs from a shell.

    python -m saelib run-notebooks [--profile smoke|default|full] [--only 00 02] [--model NAME_OR_FOLDER] [--text DATASET]
    python -m saelib harvest --hooks blocks.2.hook_resid_post [--model embedded] [--tokens 1000000]
    python -m saelib train STORE_FOLDER OUT_FOLDER [--architecture topk] [--d-sae 4096] [--k 32] [--tokens N]
    python -m saelib autointerp SAE_FOLDER OUT.csv [--features all] [--explainer patterns|top-tokens|llm]

The options of ``harvest`` and ``train`` are the fields of ``HarvestConfig``, ``SAEConfig``
and ``TrainConfig`` (their docstrings are the help), so they cannot drift apart. A failure
prints one line (exit 2 for bad input, files or disks; 1 for anything unexpected); add
``--debug`` to any command to see its traceback instead.
    python -m saelib zoo corpus      # fetch sources, train the tokenizer, tokenize
    python -m saelib zoo train       # train the embedded LM (resumable; re-run to resume)
    python -m saelib zoo export      # copy the trained weights into data/
    python -m saelib zoo hf-export OUT  # the embedded model as a transformers (GPT-NeoX) checkpoint
    python -m saelib zoo card        # measure quality, write data/MODEL_CARD.md
    python -m saelib zoo checkpoint OUT [--architecture gpt2|gpt_neox]   # tiny random real-architecture folder
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source: the config
    classes document their fields that way, and those texts are the CLI's help."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for field, after in zip(body, body[1:]):
        if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[field.target.id] = " ".join(after.value.value.split())
    return docs


POSITIVE_FIELDS = {"batch_size", "total_tokens", "d_sae", "k", "shard_mb", "lr", "log_every", "checkpoint_minutes",
                   "dead_tokens", "aux_k"}
"""Config fields whose flags must be positive numbers (checked when the command line is parsed)."""


def positive(kind: type):
    """An argparse type: ``kind`` (int or float) that must be > 0, with a one-line error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0 or value != value or value in (float("inf"),):
            raise argparse.ArgumentTypeError(f"must be a positive {'integer' if kind is int else 'number'}, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _feature_count(text: str) -> str:
    """``--features``: "all" or a positive count."""
    if text == "all" or (text.isdigit() and int(text) > 0):
        return text
    raise argparse.ArgumentTypeError(f"use 'all' or a positive number of features, not {text!r}")


def _value_type(hint) -> type:
    """``int`` for ``int | None``, ``list`` for ``list[str]``, else the type itself."""
    import types
    import typing

    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def add_config_args(parser, cls, skip=(), required=(), aliases=None, choices=None) -> None:
    """One option per field of dataclass ``cls`` (``--field-name``; booleans get
    ``--no-field-name`` too), with the field's type, default and docstring: the flags
    cannot drift from the config. ``config_from_args`` builds the config back."""
    import dataclasses
    import typing

    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    aliases, choices = aliases or {}, choices or {}
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        names = ["--" + field.name.replace("_", "-"), *aliases.get(field.name, [])]
        kind = _value_type(hints[field.name])
        options = {"dest": field.name, "help": docs.get(field.name, "")}
        if field.name in required or (field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING):
            options["required"] = True
        elif field.default is not dataclasses.MISSING:
            options["default"] = field.default
        else:
            options["default"] = field.default_factory()
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            options["nargs"] = "+"
        else:
            options["type"] = positive(kind) if field.name in POSITIVE_FIELDS and kind in (int, float) else kind
            if field.name in choices:
                options["choices"] = choices[field.name]
        if "default" in options:
            options["help"] += f" (default: {options['default']!r})"
        parser.add_argument(*names, **options)


def config_from_args(cls, args, **fixed):
    """An instance of dataclass ``cls`` from the options ``add_config_args`` added, plus ``fixed``."""
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **fixed})


def _device(name: str) -> str:
    """``--device``, refused at once when it names an accelerator this machine lacks."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: this machine has no Apple GPU; use --device cpu")
    return name


def _cmd_run_notebooks(args) -> int:
    if args.profile:
        os.environ["SAELIB_PROFILE"] = args.profile
    if args.model:
        from .models import EMBEDDED, is_local_path

        if args.model != EMBEDDED and is_local_path(args.model) and not Path(args.model).expanduser().is_dir():
            raise FileNotFoundError(f"--model {args.model}: no such checkpoint folder")
        # an absolute path, so notebooks (run in notebooks/) find a relative folder too
        os.environ["SAELIB_MODEL"] = str(Path(args.model).expanduser().resolve()) if is_local_path(args.model) else args.model
    if args.text:
        from .data import EMBEDDED_TEXT

        # a local path made absolute, so notebooks (run in notebooks/) find it too
        local = args.text != EMBEDDED_TEXT and Path(args.text).expanduser().exists()
        os.environ["SAELIB_TEXT"] = str(Path(args.text).expanduser().resolve()) if local else args.text
    from .report import run_all

    table = run_all(only=args.only, timeout=args.timeout, model=os.environ.get("SAELIB_MODEL"))
    return 0 if bool(table["ok"].all()) else 1


def _cmd_harvest(args) -> int:
    import torch

    from .data import token_windows
    from .harvest import HarvestConfig, harvest
    from .models import load_model

    import torch.distributed as dist

    from .distributed import init_from_env, local_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = local_device(_device(args.device))
    group = init_from_env(device)  # under torchrun: each rank harvests its share of the shards
    try:
        model = load_model(args.model, device=device)
        tokens_NL = token_windows(model, args.tokens, context_len=args.context_len, seed=args.seed, text=args.text)
        stores = harvest(model, tokens_NL, config_from_args(HarvestConfig, args), group=group)
    finally:
        if group.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if group.is_main:
        for store in stores.values():
            print(f"{store.folder}: {store!r}" + (f" (harvested by {group.world} ranks)" if group.world > 1 else ""))
    return 0


def _cmd_autointerp(args) -> int:
    import numpy as np

    from .autointerp.patterns import KINDS, PatternExplainer, PatternSimulator, Vocabulary
    from .autointerp.pipeline import score_features
    from .autointerp.scorers import bootstrap_interval
    from .features import FeatureActivations
    from .files import write_text_atomic
    from .harvest import harvest_sample
    from .models import load_model
    from .sae_io import load_sae

    if not str(args.out).endswith(".csv"):
        raise ValueError(f"output {args.out!r} should be a .csv file (one row per feature)")
    sae = load_sae(args.sae)
    model = load_model(sae.cfg.model_name or "embedded", device=args.device)
    hook = sae.cfg.hook_name
    store = harvest_sample(model, [hook], args.tokens, split=args.split, seed=args.seed)[hook]
    acts = FeatureActivations.collect(sae.to(args.device), store)
    live = np.flatnonzero(np.diff(acts.offsets_F1) > 0)
    if args.features != "all":
        count = int(args.features)
        live = np.sort(np.random.default_rng(args.seed).choice(live, min(count, len(live)), replace=False))
    if len(live) == 0:
        raise ValueError(f"no latent of {args.sae} fires on the {acts.n_rows:,} tokens scored: nothing to explain "
                         "(more --tokens, or check the SAE)")
    vocabulary = Vocabulary.of_tokenizer(model.tokenizer)
    if args.explainer == "llm":
        from .autointerp.llm import ChatClient, LLMConfig, LLMExplainer, LLMSimulator

        overrides = {k: v for k, v in {"base_url": args.llm_base_url, "model": args.llm_model}.items() if v}
        client = ChatClient(LLMConfig(**overrides))
        explainer, simulator = LLMExplainer(client, vocabulary), LLMSimulator(client, vocabulary)
    else:
        kinds = ("token",) if args.explainer == "top-tokens" else KINDS
        explainer, simulator = PatternExplainer(vocabulary, kinds=kinds), PatternSimulator(vocabulary)
    scores = score_features(acts, live, explainer, simulator, seed=args.seed)
    write_text_atomic(Path(args.out), scores.to_csv(index=False))
    for scorer in ["correlation", "detection", "fuzzing"]:
        values = scores[scorer].dropna()
        if len(values):
            mean, low, high = bootstrap_interval(values, seed=args.seed)
            print(f"{scorer:12s} {mean:.3f} [{low:.3f}, {high:.3f}] over {len(values)} features")
    failed = int((scores.failure != "").sum())
    print(f"{len(scores)} features of {args.sae} scored on {acts.n_rows:,} {args.split} tokens -> {args.out}"
          + (f"; {failed} failed (see the failure column)" if failed else ""))
    if args.explainer == "llm":
        print(client.usage)
    return 0


def _cmd_train(args) -> int:
    """Train one SAE; under torchrun every rank runs this and shares each batch (DDP)."""
    import torch
    import torch.distributed as dist

    from .distributed import init_from_env, local_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = local_device(_device(args.device))
    group = init_from_env(device)
    try:
        return _train_command(args, device, group)
    finally:
        if group.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train_command(args, device: str, group) -> int:
    import dataclasses

    from .sae import SAEConfig
    from .store import ActivationStore
    from .train import TrainConfig, train_many

    stores = {}
    for folder in args.store:
        store = ActivationStore(folder)
        if store.hook in stores:
            raise ValueError(f"stores {stores[store.hook].folder} and {folder} both hold {store.hook}: give one store per hook")
        stores[store.hook] = store
    out = Path(args.out)
    train_cfg = config_from_args(TrainConfig, args, out_dir=str(out / "checkpoint"))
    runs = {}
    for hook, store in stores.items():
        sae_cfg = config_from_args(SAEConfig, args, d_in=store.d_in, model_name=store.manifest.model, hook_name=hook)
        base = out / hook if len(stores) > 1 else out
        for point in _sweep_points(args.sweep or [], SAEConfig, TrainConfig):
            folder = base / "_".join(f"{k}={v}" for k, v in point.items()) if point else base
            run_sae = dataclasses.replace(sae_cfg, **{k: v for k, v in point.items() if hasattr(sae_cfg, k)})
            run_train = dataclasses.replace(train_cfg, out_dir=str(folder / "checkpoint"),
                                            **{k: v for k, v in point.items() if not hasattr(sae_cfg, k)})
            if run_sae.architecture == "relu" and run_train.l1_coefficient <= 0:
                raise ValueError("a relu SAE needs an L1 penalty: pass --l1-coefficient, e.g. 0.1 (notebook 03's value)")
            runs[folder] = (run_sae, run_train)
    # one read of the data for every SAE of a sweep, and of every hook
    results = train_many(runs, stores, device=device, max_minutes=args.max_minutes)
    if not group.is_main:  # rank 0 writes the SAEs and reports; the others hold the same weights
        return 0
    for folder, result in results.items():
        result.sae.save(folder)
        _report_trained(result, runs[folder][1], folder, group.world)
    return 0


def _sweep_points(items: list[str], *configs) -> list[dict]:
    """``["k=16,32", "d_sae=4096"]`` -> one dict per combination ({} without a sweep), each
    value converted to its field's type as the matching option would convert it."""
    import dataclasses
    import itertools
    import typing

    kinds = {f.name: _value_type(typing.get_type_hints(cls)[f.name]) for cls in configs for f in dataclasses.fields(cls)}
    names, values = [], []
    for item in items:
        name, _, listed = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if name not in kinds or not listed:
            raise ValueError(f"--sweep {item!r}: write FIELD=V1,V2,... with a field of the train options (e.g. k=16,32,64)")
        try:
            values.append([kinds[name](v) for v in listed.split(",")])
        except ValueError:
            raise ValueError(f"--sweep {item!r}: {name} takes {kinds[name].__name__} values") from None
        names.append(name)
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def _report_trained(result, train_cfg, out: Path, world: int) -> None:
    # the step trained and checkpointed, not the last logged row's (rows come every log_every steps)
    logged = result.metrics.dropna(subset=["fvu"]) if "fvu" in result.metrics else result.metrics.iloc[:0]
    quality = (f"at logged step {int(logged.step.iloc[-1])}: FVU {logged.fvu.iloc[-1]:.4f}, L0 {logged.l0.iloc[-1]:.1f}; "
               if len(logged) else "")
    done = result.step >= train_cfg.steps()
    print(f"{'trained' if done else 'stopped at'} step {result.step} of {train_cfg.steps()}: SAE saved to {out}, "
          f"checkpoint {Path(train_cfg.out_dir) / 'trainer_state.pt'} holds step {result.step}"
          f"{'' if done else ' (rerun the same command to continue)'}; {quality}"
          f"dead {result.dead_fraction:.2%}, {result.tokens_per_s:,.0f} tokens/s"
          + (f" over {world} ranks" if world > 1 else ""))


def _cmd_zoo_corpus(args) -> int:
    from .zoo.tokenizer import build_all

    build_all(Path(args.build_dir), vocab_size=args.vocab_size)
    return 0


def _train_config(args):
    from .zoo.lm import LMConfig
    from .zoo.train_lm import TrainLMConfig

    build = Path(args.build_dir)
    return TrainLMConfig(
        model=LMConfig(positional_embedding_type=args.positions),
        repeat_layout=args.repeat_layout,
        train_tokens=str(build / "tokens" / "train.bin"),
        val_tokens=str(build / "tokens" / "val.bin"),
        out_dir=str(build / args.run_name),
        total_tokens=args.total_tokens,
        batch_size=args.batch_size,
        lr=args.lr,
        repeat_share=args.repeat_share,
        random_repeat_share=args.random_repeat_share,
        bf16=not args.fp32,
        warmup_steps=args.warmup_steps,
        init_from=args.init_from or "",
        copy_warmup_steps=args.copy_warmup_steps,
        copy_warmup_share=args.copy_warmup_share,
        copy_warmup_period=args.copy_warmup_period,
        min_repeat_len=args.min_repeat_len,
        focus_source=args.focus_source or "",
        focus_share=args.focus_share,
        device=args.device,
        seed=args.seed,
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

    export_embedded(Path(args.build_dir), run_name=args.run_name)
    return 0


def _cmd_zoo_hf_export(args) -> int:
    from .zoo.hf_export import export_embedded_to_hf

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} exists and is not empty: give a new folder for the checkpoint")
    folder = export_embedded_to_hf(out)
    print(f"{folder}: the embedded model as a GPT-NeoX transformers checkpoint (hidden size widened to carry the "
          "unembedding bias; logits equal to saelib's). Load it with AutoModelForCausalLM.from_pretrained, "
          "TransformerLens, or MODEL=<this folder>.")
    return 0


def _cmd_zoo_checkpoint(args) -> int:
    from .zoo.checkpoints import make_checkpoint

    folder = make_checkpoint(args.out, args.architecture, n_layers=args.n_layers, d_model=args.d_model, seed=args.seed)
    print(f"{folder}: random-weight {args.architecture} checkpoint ({args.n_layers} layers, d_model {args.d_model}); "
          f"try `bash run.sh all --model {folder} --profile smoke`")
    return 0


def _cmd_zoo_card(args) -> int:
    from .zoo.quality import write_model_card

    write_model_card(Path(args.build_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .harvest import HarvestConfig
    from .sae import ARCHITECTURES, SAEConfig
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="python -m saelib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run-notebooks", help="execute all notebooks, write executed copies and HTML reports")
    run.add_argument("--profile", choices=["smoke", "default", "full"], help="sets SAELIB_PROFILE")
    run.add_argument("--only", nargs="*", help="notebook name prefixes to run (default: all)")
    run.add_argument("--timeout", type=positive(int), default=3600, help="seconds per cell")
    run.add_argument("--model", help="model of every notebook: 'embedded' (default), a TransformerLens pretrained "
                                     "name, or a local Hugging Face checkpoint folder (sets SAELIB_MODEL)")
    run.add_argument("--text", help="text of every notebook: 'embedded' (the shipped sample, default), a Hugging Face "
                                    "dataset name streamed from the hub, or local .jsonl/.txt/.parquet files (sets SAELIB_TEXT)")
    run.set_defaults(func=_cmd_run_notebooks)

    hv = sub.add_parser("harvest", help="store activations of hook points (resumes an interrupted run)")
    hv.add_argument("--model", default="embedded", help="'embedded' or a TransformerLens pretrained name")
    hv.add_argument("--tokens", type=positive(int), default=1_000_000, help="tokens to run (from the shipped sample text, or --text)")
    hv.add_argument("--text", help="a Hugging Face text dataset or local .jsonl/.txt/.parquet files instead of the shipped sample")
    hv.add_argument("--context-len", type=positive(int), default=128, help="tokens per window, BOS included")
    hv.add_argument("--seed", type=int, default=0, help="which windows of the sample text")
    hv.add_argument("--device", default="cpu")
    hv.add_argument("--threads", type=positive(int), help="torch threads")
    add_config_args(hv, HarvestConfig, required=("hooks",), choices={"dtype": ["float16", "float32"]})
    hv.set_defaults(func=_cmd_harvest)

    tr = sub.add_parser("train", help="train an SAE on an activation store (re-run to resume)")
    tr.add_argument("store", nargs="+", help="activation store folder (one hook), e.g. from `harvest`; several stores of "
                    "one harvest (e.g. every layer's residual stream) train one SAE each from one shared read, into OUT/<hook>")
    tr.add_argument("out", help="folder for the trained SAE (cfg.json + sae_weights.safetensors); checkpoints in OUT/checkpoint")
    add_config_args(tr, SAEConfig, skip=("d_in", "model_name", "hook_name", "metadata"),
                    choices={"architecture": [n for n, cls in ARCHITECTURES.items() if cls.trains]})
    add_config_args(tr, TrainConfig, skip=("out_dir",), aliases={"total_tokens": ["--tokens"], "l1_coefficient": ["--l1"]},
                    choices={"b_dec_init": ["geometric_median", "mean", "zeros"], "dictionary_init": ["tied", "data"],
                             "kernels": ["sparse", "dense", "auto"]})
    tr.add_argument("--sweep", nargs="+", metavar="FIELD=V1,V2",
                    help="train one SAE per combination (e.g. k=16,32,64 d_sae=4096,8192) from one read of the store, "
                         "each into OUT/FIELD=V_... ; the other options apply to all")
    tr.add_argument("--max-minutes", type=positive(float), help="stop (with a checkpoint) after this long")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--threads", type=positive(int), help="torch threads")
    tr.set_defaults(func=_cmd_train)

    ai = sub.add_parser("autointerp", help="explain and score an SAE's features (offline, or with an LLM server)")
    ai.add_argument("sae", help="SAE folder (cfg.json + sae_weights.safetensors) naming its model and hook")
    ai.add_argument("out", help="CSV file: one row per feature (explanation, correlation, detection, fuzzing, counts)")
    ai.add_argument("--features", default="all", type=_feature_count, help="'all' live features, or how many to draw at random")
    ai.add_argument("--explainer", choices=["patterns", "top-tokens", "llm"], default="patterns",
                    help="offline pattern explainer, its top-tokens-only reference, or an OpenAI-compatible LLM")
    ai.add_argument("--tokens", type=positive(int), default=100_000, help="tokens of shipped text to explain and score on")
    ai.add_argument("--split", choices=["heldout", "train"], default="heldout", help="which part of the shipped text")
    ai.add_argument("--llm-base-url", help="server root ending in /v1 (default: $SAELIB_LLM_BASE_URL)")
    ai.add_argument("--llm-model", help="model name on that server (default: $SAELIB_LLM_MODEL)")
    ai.add_argument("--seed", type=int, default=0, help="which windows and features")
    ai.add_argument("--device", default="cpu")
    ai.set_defaults(func=_cmd_autointerp)

    zoo = sub.add_parser("zoo", help="build the embedded default model").add_subparsers(dest="step", required=True)
    ck = zoo.add_parser("checkpoint", help="save a tiny random-weight GPT-2 or GPT-NeoX checkpoint folder (offline "
                                           "stand-in for a downloaded model, to try the real-model path)")
    ck.add_argument("out", help="folder to write (config.json, model.safetensors, tokenizer files)")
    ck.add_argument("--architecture", choices=["gpt2", "gpt_neox"], default="gpt2")
    ck.add_argument("--n-layers", type=int, default=2)
    ck.add_argument("--d-model", type=int, default=64)
    ck.add_argument("--seed", type=int, default=0)
    ck.set_defaults(func=_cmd_zoo_checkpoint)
    hx = zoo.add_parser("hf-export", help="write the embedded model as a standard Hugging Face transformers "
                                          "checkpoint folder (GPT-NeoX, logits equal to saelib's)")
    hx.add_argument("out", help="new folder to write (config.json, model.safetensors, tokenizer files)")
    hx.set_defaults(func=_cmd_zoo_hf_export)
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
            step.add_argument("--total-tokens", type=int, default=20_000_000, help="length of the lr schedule")
            step.add_argument("--batch-size", type=int, default=16, help="sequences of n_ctx tokens per step")
            step.add_argument("--lr", type=float, default=2e-3)
            step.add_argument(
                "--positions", choices=["rotary", "standard"], default="rotary",
                help="rotary (relative) or learned absolute position embeddings",
            )  # fmt: skip
            step.add_argument(
                "--repeat-layout", choices=["random", "half"], default="random",
                help="where repeated rows put their two copies (see TrainLMConfig.repeat_layout)",
            )  # fmt: skip
            step.add_argument("--repeat-share", type=float, default=0.1, help="rows of text chunk + its copy")
            step.add_argument("--random-repeat-share", type=float, default=0.1, help="rows of random tokens + their copy")
            step.add_argument("--fp32", action="store_true", help="no bfloat16 autocast")
            step.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this long")
            step.add_argument("--max-steps", type=int, help="stop after this many more steps")
            step.add_argument("--threads", type=int, help="torch threads")
            step.add_argument("--warmup-steps", type=int, default=100, help="linear lr warm-up steps")
            step.add_argument("--copy-warmup-steps", type=int, default=0, help="first steps with more random-copy rows")
            step.add_argument("--copy-warmup-share", type=float, default=0.5, help="random-copy share in those steps")
            step.add_argument("--copy-warmup-period", type=int, default=0, help="if > 0, those rows repeat a chunk of at most this length")
            step.add_argument("--min-repeat-len", type=int, default=8, help="shortest repeated chunk (and period)")
            step.add_argument("--focus-source", help="corpus source to over-sample, e.g. stories")
            step.add_argument("--focus-share", type=float, default=0.0, help="share of rows drawn from --focus-source")
            step.add_argument("--init-from", help="start from these weights (checkpoint.pt or .safetensors)")
            step.add_argument("--seed", type=int, default=0, help="seeds the initialisation and every batch")
            step.add_argument("--device", default="cpu", help="cpu, or cuda to train on a GPU (minutes instead of hours)")
        if name in ("train", "export"):
            step.add_argument("--run-name", default="run", help="run folder under --build-dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .autointerp.llm import LLMRequestError, LLMUnavailableError
    from .data import TextNeedsNetworkError
    from .distributed import DistributedError
    from .files import DiskFullError, FolderLockedError
    from .models import ModelNeedsNetworkError, UnknownHookError, UnknownModelError
    from .sae_io import SAEFormatError
    from .store import StoreError
    from .train import CorruptCheckpointError, StaleCheckpointError, TrainingDivergedError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume where the last checkpoint or shard stopped", file=sys.stderr)
        return 130
    except (ModelNeedsNetworkError, TextNeedsNetworkError, UnknownModelError, UnknownHookError,
            StoreError, FolderLockedError, DiskFullError, SAEFormatError,
            StaleCheckpointError, TrainingDivergedError, CorruptCheckpointError,
            LLMUnavailableError, LLMRequestError, DistributedError, FileNotFoundError, ValueError) as err:
        # Errors that explain themselves: their message, without a traceback.
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # anything else: still one line, the traceback on request
        if debug:
            raise
        print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
              "(an unexpected failure: rerun with --debug for the traceback, and report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
