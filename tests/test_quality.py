import numpy as np
import pytest
import torch

from saelib.zoo.ioi_templates import IOI_EVAL_TEMPLATES
from saelib.ioi import ioi_prompts
from saelib.zoo.probes import induction_losses
from saelib.zoo.quality import ngram_counts, ngram_losses, passes


def test_bigram_beats_unigram_on_a_deterministic_cycle():
    V = 5
    cycle = np.tile(np.arange(V, dtype=np.uint16), 200)
    unigram, bigram = ngram_counts(cycle, V)
    uni_loss, bi_loss = ngram_losses(unigram, bigram, cycle)
    assert uni_loss == pytest.approx(np.log(V), abs=0.01)  # every token equally likely
    assert bi_loss < 0.01  # the next token is certain given the previous one


def test_bigram_probabilities_sum_to_one_for_every_context():
    rng = np.random.default_rng(0)
    V = 7
    train = rng.integers(0, V, 500).astype(np.uint16)
    unigram, bigram = ngram_counts(train, V)
    for prev in range(V):
        # the loss of a 2-token sequence (prev, nxt) is -log p(nxt | prev)
        probs = [np.exp(-ngram_losses(unigram, bigram, np.array([prev, nxt], dtype=np.uint16))[1]) for nxt in range(V)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-6)


def test_ioi_prompts_balance_orders_and_end_before_the_answer():
    prompts = ioi_prompts(["Mary", "John", "Anna", "Tom"], n_prompts=40, seed=1)
    assert {p.order for p in prompts} == {"ABBA", "BABA"}
    for p in prompts:
        assert p.io != p.s and p.text.count(p.s) == 2 and p.text.count(p.io) == 1
        assert not p.text.endswith(p.io)
        first_clause = p.text.split(" and ")[0]
        assert first_clause.endswith(p.io if p.order == "ABBA" else p.s)
    assert len({p.template for p in prompts}) > 5 and all(p.template < len(IOI_EVAL_TEMPLATES) for p in prompts)


def test_induction_probe_reads_the_copies(tiny_model):
    result = induction_losses(tiny_model, seq_len=10, n_seqs=4)
    # an untrained model has no induction: both copies cost about the same
    assert result.first_copy_loss > 0 and 0.8 < result.ratio < 1.2


def test_passes_names_each_bar():
    numbers = {
        "overall": {"model": 3.0, "bigram": 3.6},
        "induction": {"ratio": 0.4},
        "ioi": {"mean_logit_diff": 0.9, "positive_share": 0.85},
    }
    assert passes(numbers) == {
        "held-out loss >= 0.5 nats below bigram": True,
        "induction second/first <= 0.5": True,
        "IOI mean logit diff >= 1.0": False,
        "IOI positive share >= 80%": True,
    }
