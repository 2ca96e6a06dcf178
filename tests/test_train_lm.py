import dataclasses
import json

import numpy as np
import pytest
import torch

from saelib.zoo.train_lm import LMTrainer, TrainLMConfig, learning_rate, sample_batch, source_span


@pytest.fixture
def run_cfg(tmp_path, tiny_cfg) -> TrainLMConfig:
    rng = np.random.default_rng(0)
    for split, n in [("train", 5000), ("val", 800)]:
        rng.integers(1, tiny_cfg.d_vocab, n, dtype=np.uint16).tofile(tmp_path / f"{split}.bin")
    return TrainLMConfig(
        train_tokens=str(tmp_path / "train.bin"),
        val_tokens=str(tmp_path / "val.bin"),
        out_dir=str(tmp_path / "run"),
        model=tiny_cfg,
        batch_size=4,
        total_tokens=4 * tiny_cfg.n_ctx * 6,
        warmup_steps=2,
        eval_every=3,
        eval_batches=2,
    )


def test_batches_are_a_function_of_seed_and_step(run_cfg):
    tokens = np.fromfile(run_cfg.train_tokens, dtype=np.uint16)
    a, b = sample_batch(tokens, run_cfg, 5), sample_batch(tokens, run_cfg, 5)
    assert torch.equal(a, b) and not torch.equal(a, sample_batch(tokens, run_cfg, 6))
    assert a.shape == (run_cfg.batch_size, run_cfg.model.n_ctx) and (a[:, 0] == run_cfg.bos_token_id).all()


def _copies(row: torch.Tensor, min_len: int) -> list[tuple[int, int, int]]:
    """(first, second, length) of the longest repeated chunks of at least ``min_len`` tokens
    in a row of distinct-ish tokens, found by brute force."""
    found, n = [], len(row)
    for a in range(1, n):
        for b in range(a + 1, n):
            length = 0
            while b + length < n and row[a + length] == row[b + length] and a + length < b:
                length += 1
            if length >= min_len and (a == 1 or row[a - 1] != row[b - 1]):
                found.append((a, b, length))
    return found


@pytest.mark.parametrize("shares", [(1.0, 0.0), (0.0, 1.0)], ids=["text", "random"])
def test_half_layout_rows_copy_their_first_half(run_cfg, shares):
    cfg = dataclasses.replace(run_cfg, repeat_share=shares[0], random_repeat_share=shares[1], repeat_layout="half")
    tokens = np.fromfile(cfg.train_tokens, dtype=np.uint16)
    batch = sample_batch(tokens, cfg, 0)
    half = (cfg.model.n_ctx - 1) // 2
    assert torch.equal(batch[:, 1 : 1 + half], batch[:, 1 + half : 1 + 2 * half])
    plain = sample_batch(tokens, dataclasses.replace(cfg, repeat_share=0.0, random_repeat_share=0.0), 0)
    # text repeats copy the corpus window; random repeats do not come from the corpus
    assert torch.equal(batch[:, 1 : 1 + half], plain[:, 1 : 1 + half]) == (shares[0] == 1.0)


@pytest.mark.parametrize("shares", [(1.0, 0.0), (0.0, 1.0)], ids=["text", "random"])
def test_random_layout_puts_copies_of_varied_length_at_varied_places(run_cfg, shares):
    cfg = dataclasses.replace(run_cfg, repeat_share=shares[0], random_repeat_share=shares[1], batch_size=24)
    assert cfg.repeat_layout == "random"
    tokens = np.fromfile(cfg.train_tokens, dtype=np.uint16)  # random tokens: chance repeats are short
    batch = sample_batch(tokens, cfg, 0)
    plain = sample_batch(tokens, dataclasses.replace(cfg, repeat_share=0.0, random_repeat_share=0.0), 0)
    layouts = []
    for row, text in zip(batch, plain):
        copies = _copies(row, cfg.min_repeat_len)
        assert len(copies) == 1, copies
        first, second, length = copies[0]
        assert cfg.min_repeat_len <= length and second >= first + length
        layouts.append(copies[0])
        # everything outside the second copy is the row's own text, except a random chunk
        outside = torch.ones(len(row), dtype=torch.bool)
        outside[second : second + length] = False
        if shares[1]:
            outside[first : first + length] = False
        assert torch.equal(row[outside], text[outside])
    # no fixed distance back predicts the copy (n_ctx 32 leaves room for ~16 distances)
    assert len({second - first for first, second, _ in layouts}) >= 6
    assert len({length for *_, length in layouts}) >= 5


def test_configs_saved_before_the_layout_field_keep_their_batches(run_cfg):
    saved = run_cfg.to_dict()
    del saved["repeat_layout"], saved["min_repeat_len"]
    old = TrainLMConfig.from_dict({**saved, "repeat_share": 1.0})
    assert old.repeat_layout == "half"
    batch = sample_batch(np.fromfile(run_cfg.train_tokens, dtype=np.uint16), old, 0)
    half = (run_cfg.model.n_ctx - 1) // 2
    assert torch.equal(batch[:, 1 : 1 + half], batch[:, 1 + half : 1 + 2 * half])
    with pytest.raises(ValueError, match="repeat_layout"):
        sample_batch(np.zeros(1000, dtype=np.uint16), dataclasses.replace(run_cfg, repeat_layout="middle"), 0)


def test_learning_rate_warms_up_then_decays_to_floor(run_cfg):
    lrs = [learning_rate(run_cfg, s) for s in range(run_cfg.steps() + 1)]
    assert lrs[0] < lrs[1] == pytest.approx(run_cfg.lr)
    assert lrs[-1] == pytest.approx(run_cfg.lr * run_cfg.min_lr_ratio)
    assert all(x >= y for x, y in zip(lrs[1:], lrs[2:]))


def test_resume_equals_uninterrupted_training(run_cfg, tmp_path):
    straight = LMTrainer(dataclasses.replace(run_cfg, out_dir=str(tmp_path / "straight")))
    straight.run()
    interrupted_cfg = dataclasses.replace(run_cfg, out_dir=str(tmp_path / "interrupted"))
    LMTrainer(interrupted_cfg).run(max_steps=2)  # checkpointed at step 2 ...
    with open(tmp_path / "interrupted" / "metrics.jsonl", "a") as log:  # ... killed after logging step 3
        log.write(json.dumps({"step": 3, "loss": 99.0}) + "\n")
    resumed = LMTrainer(interrupted_cfg)
    assert resumed.step == 2
    resumed.run()
    assert resumed.step == straight.step == run_cfg.steps()
    logged = [json.loads(r) for r in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, run_cfg.steps() + 1))
    assert all(r["loss"] != 99.0 for r in logged)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_training_learns_a_deterministic_successor(run_cfg, tmp_path):
    # every token has one fixed successor: a bigram model predicts it exactly
    successor = np.random.default_rng(1).permutation(np.arange(1, run_cfg.model.d_vocab))
    tokens = np.empty(5000, dtype=np.uint16)
    tokens[0] = 1
    for i in range(1, len(tokens)):
        tokens[i] = successor[tokens[i - 1] - 1]
    tokens.tofile(tmp_path / "chain.bin")
    cfg = dataclasses.replace(
        run_cfg, train_tokens=str(tmp_path / "chain.bin"), total_tokens=4 * run_cfg.model.n_ctx * 60, lr=1e-2, repeat_share=0.0
    )
    trainer = LMTrainer(cfg)
    probe = sample_batch(tokens, cfg, 10_000)
    with torch.no_grad():
        before = trainer.model.loss(probe).item()
    trainer.run()
    with torch.no_grad():
        after = trainer.model.loss(probe).item()
    assert before > np.log(cfg.model.d_vocab) - 0.5 and after < 0.5 * before, (before, after)


def test_checkpoint_for_another_model_is_refused(run_cfg):
    LMTrainer(run_cfg).run(max_steps=1)
    other = dataclasses.replace(run_cfg, model=dataclasses.replace(run_cfg.model, d_mlp=128))
    with pytest.raises(ValueError, match="was made for model"):
        LMTrainer(other)


def test_copy_warmup_raises_the_random_copy_share_only_early(run_cfg):
    cfg = dataclasses.replace(
        run_cfg, repeat_share=0.0, random_repeat_share=0.0, copy_warmup_steps=3, copy_warmup_share=1.0, repeat_layout="half"
    )
    tokens = np.fromfile(cfg.train_tokens, dtype=np.uint16)
    half = (cfg.model.n_ctx - 1) // 2
    plain = dataclasses.replace(cfg, copy_warmup_steps=0)
    for step, copying in [(0, True), (2, True), (3, False)]:
        batch = sample_batch(tokens, cfg, step)
        assert torch.equal(batch[:, 1 : 1 + half], batch[:, 1 + half : 1 + 2 * half]) == copying
        assert torch.equal(batch, sample_batch(tokens, plain, step)) != copying


def test_periodic_copy_warmup_rows_repeat_a_short_chunk(run_cfg):
    cfg = dataclasses.replace(
        run_cfg, repeat_share=0.0, copy_warmup_steps=2, copy_warmup_share=1.0, copy_warmup_period=12, min_repeat_len=4
    )
    tokens = np.fromfile(cfg.train_tokens, dtype=np.uint16)
    periods = set()
    for row in sample_batch(tokens, dataclasses.replace(cfg, batch_size=32), 0)[:, 1:]:
        period = next(p for p in range(1, len(row)) if torch.equal(row[p:], row[:-p]))
        assert 4 <= period <= 12
        periods.add(period)
    assert len(periods) >= 5
    after = sample_batch(tokens, cfg, 2)[:, 1:]  # warm-up over: the random layout's single copy
    assert not any(torch.equal(row[p:], row[:-p]) for row in after for p in range(1, 13))


def test_focus_source_rows_start_inside_its_span(run_cfg, tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"splits": {"train": {"sources": {"a": {"start": 0, "end": 4000}, "b": {"start": 4000, "end": 5000}}}}}))
    tokens = np.fromfile(run_cfg.train_tokens, dtype=np.uint16)
    cfg = dataclasses.replace(run_cfg, focus_source="b", focus_share=1.0, repeat_share=0.0, batch_size=16)
    span = source_span(cfg)
    assert span == (4000, 5000)
    inside = {tuple(tokens[i : i + cfg.model.n_ctx - 1]) for i in range(4000, 5000 - cfg.model.n_ctx + 2)}
    assert all(tuple(row[1:].tolist()) in inside for row in sample_batch(tokens, cfg, 0, span))
    assert source_span(dataclasses.replace(cfg, focus_share=0.0)) is None
    with pytest.raises(ValueError, match="sources: a, b"):
        source_span(dataclasses.replace(cfg, focus_source="c"))


def test_induction_ratio_is_low_only_for_a_copying_model(tiny_lean):
    class Copier(torch.nn.Module):
        """Predicts token t+1 as the token that followed the previous occurrence of token t."""

        cfg = dataclasses.replace(tiny_lean.cfg, d_vocab=5000, n_ctx=64)  # few repeats within one copy

        def forward(self, tokens_BS):
            B, S = tokens_BS.shape
            logits = torch.zeros(B, S, self.cfg.d_vocab)
            for b in range(B):
                for t in range(S):
                    earlier = (tokens_BS[b, :t] == tokens_BS[b, t]).nonzero()
                    if len(earlier):
                        logits[b, t, tokens_BS[b, earlier[-1, 0] + 1]] = 20.0
            return logits

    from saelib.zoo.train_lm import induction_ratio

    assert induction_ratio(Copier()) < 0.1
    assert 0.8 < induction_ratio(tiny_lean) < 1.2
