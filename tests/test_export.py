import dataclasses
import json

import numpy as np
import torch

from saelib.models import load_model
from saelib.zoo.export import export_embedded, token_windows
from saelib.zoo.tokenizer import tokenize_corpus, train_tokenizer
from saelib.zoo.train_lm import LMTrainer, TrainLMConfig


def test_token_windows_start_with_bos_and_do_not_overlap():
    tokens = np.arange(1, 101, dtype=np.uint16)
    ordered = token_windows(tokens, n_ctx=11, n_rows=None, bos_id=0, seed=None)
    assert ordered.shape == (10, 11) and (ordered[:, 0] == 0).all()
    assert np.array_equal(ordered[:, 1:].ravel(), tokens)
    drawn = token_windows(tokens, n_ctx=11, n_rows=4, bos_id=0, seed=3)
    assert drawn.shape == (4, 11) and len(set(drawn[:, 1].tolist())) == 4


def test_exported_model_loads_with_the_trained_logits(tmp_path, tiny_cfg, monkeypatch):
    build = tmp_path / "build"
    (build / "corpus").mkdir(parents=True)
    texts = ["Mary gave the book to John.", "def f(x):\n    return x + 1", "Call me Ishmael."] * 30
    (build / "corpus" / "toy.train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (build / "corpus" / "toy.val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:30]))
    (build / "corpus" / "manifest.json").write_text(json.dumps({"sources": {"toy": {"docs": {"train": 90, "val": 30}}}}))
    tokenizer = train_tokenizer(build / "corpus", build / "tokenizer.json", vocab_size=600)
    tokenize_corpus(build / "corpus", build / "tokenizer.json", build / "tokens")
    vocab = len(tokenizer)
    cfg = TrainLMConfig(
        train_tokens=str(build / "tokens" / "train.bin"), val_tokens=str(build / "tokens" / "val.bin"),
        out_dir=str(build / "run"), model=dataclasses.replace(tiny_cfg, d_vocab=vocab),
        batch_size=2, total_tokens=2 * tiny_cfg.n_ctx * 2, eval_every=100,
    )
    trainer = LMTrainer(cfg)
    trainer.run()
    out = export_embedded(build, tmp_path / "data", sample_rows=4, sample_ctx=8)
    monkeypatch.setenv("SAELIB_DATA", str(out))
    model = load_model("embedded", device="cpu")
    tokens = torch.from_numpy(np.load(out / "tokens_sample.npy").astype(np.int64))
    with torch.no_grad():
        assert torch.allclose(model(tokens), trainer.model(tokens), atol=1e-5)
    assert json.loads((out / "training.json").read_text())["steps"] == cfg.steps()

    # a second stage fine-tunes the first run's checkpoint: the export describes both
    finetune = dataclasses.replace(cfg, out_dir=str(build / "finetune"), init_from=str(build / "run" / "checkpoint.pt"), lr=3e-4)
    LMTrainer(finetune).run(max_steps=1)
    training = json.loads((export_embedded(build, tmp_path / "data2", sample_rows=4, sample_ctx=8, run_name="finetune") / "training.json").read_text())
    assert training["steps"] == cfg.steps() + 1
    assert training["stage 1"].startswith(f"{cfg.steps()} of {cfg.steps()} steps") and "random initialisation" in training["stage 1"]
    assert training["stage 2"].startswith(f"1 of {cfg.steps()} steps") and "previous stage" in training["stage 2"]


def test_readme_rebuild_command_is_how_the_shipped_model_was_trained():
    """The `zoo train` command in README.md, parsed by the CLI, describes the same training as
    data/training.json, so a user who runs it rebuilds the shipped model's recipe."""
    import re
    import shlex
    from pathlib import Path

    from saelib.cli import _train_config, build_parser
    from saelib.paths import data_dir
    from saelib.zoo.export import describe_stage

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    commands = [c.replace("\\\n", " ") for c in re.findall(r"python -m saelib zoo train(?:[^\n]*\\\n)*[^\n]*", readme)]
    assert len(commands) == 1, commands
    args = build_parser().parse_args(shlex.split(commands[0].split("#")[0])[3:])
    cfg = _train_config(args)
    steps = cfg.steps()
    stage = {"cfg": cfg, "steps": steps, "tokens": steps * cfg.batch_size * cfg.model.n_ctx, "run": cfg.out_dir, "start": "random initialisation"}
    training = json.loads((data_dir() / "training.json").read_text())
    assert [k for k in training if k.startswith("stage")] == ["stage 1"]
    assert describe_stage(stage) == training["stage 1"]
