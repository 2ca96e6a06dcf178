"""The embedded model as a standard transformers checkpoint (GPT-NeoX): same logits, and it
loads through transformers and through saelib's TransformerLens path (either backend)."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from saelib.models import load_model
from saelib.zoo.hf_export import gpt_neox_config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "embedded-neox"
    run = subprocess.run([sys.executable, "-m", "saelib", "zoo", "hf-export", str(folder)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return folder


def test_transformers_gives_the_embedded_models_logits(exported, embedded):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(exported)
    assert config.architectures == ["GPTNeoXForCausalLM"] and not config.use_parallel_residual
    hf = AutoModelForCausalLM.from_pretrained(exported, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported)
    text = "Mary gave the book to John because she had finished reading it."
    tokens = embedded.to_tokens(text)
    assert tokenizer(text)["input_ids"] == tokens[0].tolist()  # the same tokenizer, BOS included
    generator = torch.Generator().manual_seed(0)
    random_tokens = torch.randint(0, embedded.cfg.d_vocab, (2, embedded.cfg.n_ctx), generator=generator)
    for batch in (tokens, random_tokens):
        with torch.no_grad():
            ours, theirs = embedded(batch), hf(batch).logits
        # float32 rounding only: two implementations summing in other orders differ by up to
        # 2e-4 on an AVX-512 Xeon (under 1e-4 on an AVX2 EPYC); a wrong or misplaced weight
        # moves logits of this size by far more than 1e-3
        assert (ours - theirs).abs().max() < 1e-3
        assert ours.abs().max() > 1.0  # real logits, not a degenerate pair of zeros


def test_the_export_loads_as_a_model_folder(exported, embedded):
    # through TransformerLens's own GPT-NeoX conversion (HookedTransformer on 3.x, the bridge
    # on 4.x): it folds LayerNorm and centres the unembedding, so log-probabilities agree
    model = load_model(str(exported), device="cpu")
    assert model.cfg.d_model == embedded.cfg.d_model + embedded.cfg.n_heads
    tokens = torch.randint(0, embedded.cfg.d_vocab, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(tokens).log_softmax(-1) - embedded(tokens).log_softmax(-1)).abs().max()
    assert diff < 1e-4


def test_export_refuses_what_it_cannot_write(exported, tiny_cfg):
    run = subprocess.run([sys.executable, "-m", "saelib", "zoo", "hf-export", str(exported)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "not empty" in run.stderr and "Traceback" not in run.stderr
    with pytest.raises(ValueError, match="rotary"):
        gpt_neox_config(dataclasses.replace(tiny_cfg, positional_embedding_type="standard"))
