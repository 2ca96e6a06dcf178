"""Tiny random-weight checkpoints of real architectures (GPT-2, GPT-NeoX/Pythia), saved as
Hugging Face folders, to exercise the real-model path on a machine with no network.

A downloaded ``gpt2`` and ``make_checkpoint(folder, "gpt2")`` differ only in size and
weights: the same ``transformers`` class writes the folder, and ``load_model(folder)``
converts it with TransformerLens's own loader for that architecture. The tokenizer is a
byte-level BPE trained here on the shipped text (not the embedded model's), so text is
re-tokenised as it is for any real model; the IOI name pool is added as whole tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

ARCHITECTURES = ("gpt2", "gpt_neox")


def train_small_tokenizer(vocab_size: int = 2048, n_windows: int = 400):
    """A byte-level BPE (``PreTrainedTokenizerFast``, BOS = EOS = ``<|endoftext|>``) trained
    on the first ``n_windows`` of the shipped training text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ..data import embedded_windows
    from ..paths import data_dir
    from .tokenizer import EOT, as_transformers, load_tokenizer

    embedded = load_tokenizer(data_dir() / "tokenizer.json")
    texts = embedded.batch_decode(np.asarray(embedded_windows("train")[:n_windows, 1:]).tolist())
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    # The IOI name pool as whole tokens (as in GPT-2's vocabulary), so notebook 07 can build its prompts.
    names = json.loads((data_dir() / "name_pool.json").read_text())["names"]
    tokenizer.add_tokens([" " + name.strip() for name in names])
    return as_transformers(tokenizer, name="saelib-small-bpe")


def make_checkpoint(folder: str | Path, architecture: str = "gpt2", n_layers: int = 2, d_model: int = 64,
                    n_heads: int = 4, n_ctx: int = 256, tokenizer=None, seed: int = 0) -> Path:
    """Save a random-weight ``architecture`` model (``ARCHITECTURES``) and its tokenizer to
    ``folder`` with ``save_pretrained`` (safetensors), as a downloaded checkpoint is laid out."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
    tokenizer = tokenizer or train_small_tokenizer()
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if architecture == "gpt2":
        # n_ctx as in the published gpt2 config.json (TransformerLens reads it; transformers 5 no longer sets it)
        config = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=n_ctx, n_ctx=n_ctx, **special)
    else:
        config = GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=n_heads,
                               intermediate_size=4 * d_model, max_position_embeddings=n_ctx, rotary_pct=0.25,
                               use_parallel_residual=True, tie_word_embeddings=False, **special)
    from ..models import RANDOM_STAND_IN_FLAG

    setattr(config, RANDOM_STAND_IN_FLAG, True)  # saved in config.json: notebooks skip trained-model claims
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
