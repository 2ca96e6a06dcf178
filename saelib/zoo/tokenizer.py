"""Byte-level BPE tokenizer of the embedded model, and the corpus as token files.

``train_tokenizer`` learns an 8192-token byte-level BPE on the corpus's train split with
one special token, ``<|endoftext|>`` (id 0), which serves as BOS, EOS and padding. Every
IOI pool name with a leading space (" Mary") must be a single token; names the merges
miss are forced in by appending merges (and dropping as many last-learned ones, so the
vocabulary keeps its size). ``load_tokenizer`` wraps the result as a
``transformers.PreTrainedTokenizerFast`` that ``HookedTransformer`` accepts.

``tokenize_corpus`` writes ``train.bin`` / ``val.bin``: flat uint16 arrays in which every
document is preceded by ``<|endoftext|>``, sources one after another, plus ``meta.json``
with each source's token span, so validation loss can be read per source.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..files import sha256_file
from .corpus import DEFAULT_ROOT, DEFAULT_STORIES_DOCS, build_corpus, iter_texts, load_manifest
from .stories import FEMALE_POOL, MALE_POOL, NAME_POOL

EOT = "<|endoftext|>"
EOT_ID = 0
DEFAULT_VOCAB_SIZE = 8192
MIN_POOL_PER_GENDER = 8
MIN_POOL = 20


def new_bpe() -> Tokenizer:
    """An untrained byte-level BPE (GPT-2 style pre-tokenisation, no prefix space)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, max_token_length: int | None = 16,
    length: int | None = None,
) -> Tokenizer:
    """Learn merges from ``texts``; ``<|endoftext|>`` gets id 0, then the 256 bytes."""
    tokenizer = new_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        # Long runs like "=======" (reST underlines) would otherwise take many slots.
        max_token_length=max_token_length,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=length)
    if tokenizer.token_to_id(EOT) != EOT_ID:
        raise RuntimeError(f"{EOT} should have id {EOT_ID}, got {tokenizer.token_to_id(EOT)}")
    return tokenizer


def single_token_names(tokenizer, names: Iterable[str] = NAME_POOL) -> list[str]:
    """The names that encode to exactly one token when preceded by a space."""
    raw = raw_tokenizer(tokenizer)
    return [n for n in names if len(raw.encode(" " + n, add_special_tokens=False).ids) == 1]


def _merge_pair(merge) -> tuple[str, str]:
    return tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)


def force_single_tokens(tokenizer: Tokenizer, words: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """A copy of ``tokenizer`` in which every word of ``words`` is one token.

    A word split into pieces gets merges appended that join its pieces left to right.
    Appended merges rank last, so they only act on what the learned merges leave
    unjoined: other text tokenises as before except where it contains the word. To keep
    ``vocab_size`` (default: the current size), as many last-learned merges are dropped.
    """
    words = list(words)
    state = json.loads(tokenizer.to_str())
    model = state["model"]
    base_vocab: dict[str, int] = model["vocab"]
    base_merges = [_merge_pair(m) for m in model["merges"]]
    target = vocab_size or tokenizer.get_vocab_size()
    reserved = {t["content"] for t in state.get("added_tokens", [])}
    n_drop = 0
    for _ in range(32):
        merges = base_merges[: len(base_merges) - n_drop]
        kept = {a + b for a, b in merges}
        first_merged_id = min((base_vocab[a + b] for a, b in base_merges), default=len(base_vocab))
        # Keep specials, the byte alphabet and the products of the merges that remain.
        ordered = sorted(base_vocab.items(), key=lambda item: item[1])
        tokens = [t for t, i in ordered if i < first_merged_id or t in kept or t in reserved]
        candidate = _with_model(state, {t: i for i, t in enumerate(tokens)}, merges)
        for word in words:
            while True:
                pieces = candidate.encode(word, add_special_tokens=False).tokens
                if len(pieces) <= 1:
                    break
                joined = pieces[0] + pieces[1]
                merges.append((pieces[0], pieces[1]))
                if joined not in tokens:
                    tokens.append(joined)
                candidate = _with_model(state, {t: i for i, t in enumerate(tokens)}, merges)
        excess = len(tokens) - target
        if excess <= 0:
            return candidate
        n_drop += excess
        if n_drop > len(base_merges):
            break
    raise RuntimeError(f"could not fit {len(words)} forced tokens into {target} vocabulary entries")


def _with_model(state: dict, vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    state = dict(state)
    state["model"] = {**state["model"], "vocab": vocab, "merges": [list(m) for m in merges]}
    return Tokenizer.from_str(json.dumps(state))


def as_transformers(tokenizer: Tokenizer, name: str = "saelib-embedded"):
    """``tokenizer`` as a ``PreTrainedTokenizerFast`` with BOS = EOS = PAD = ``<|endoftext|>``.

    ``add_bos_token=True`` makes ``HookedTransformer`` use it as is (otherwise it tries to
    reload it by name from the Hugging Face hub to get a BOS-adding variant).
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT,
        add_bos_token=True, add_eos_token=False, model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
        # HookedTransformer reads name_or_path from init_kwargs, where the constructor
        # only puts it when passed explicitly.
        name_or_path=name,
    )  # fmt: skip


def raw_tokenizer(tokenizer) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind a path, a transformers tokenizer, or itself."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, Path)):
        return Tokenizer.from_file(str(tokenizer))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"not a tokenizer: {type(tokenizer).__name__}")
    return backend


def load_tokenizer(path: str | Path = DEFAULT_ROOT / "tokenizer.json"):
    """The saved tokenizer (a ``tokenizer.json`` file) as a ``PreTrainedTokenizerFast``."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: train it with `python -m saelib.zoo.tokenizer`")
    return as_transformers(Tokenizer.from_file(str(path)), name=str(path))


def train_tokenizer(
    corpus_dir: str | Path = DEFAULT_ROOT / "corpus",
    out_path: str | Path = DEFAULT_ROOT / "tokenizer.json",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    names: Iterable[str] = NAME_POOL,
    max_token_length: int | None = 16,
):
    """Train on the train split, force the pool names to single tokens, save and return it.

    Also writes ``name_pool.json`` next to ``out_path``: the pool names that are single
    tokens (all of them, unless one could not be forced), split by gender.
    """
    corpus_dir, out_path = Path(corpus_dir), Path(out_path)
    manifest = load_manifest(corpus_dir)
    n_docs = sum(s["docs"]["train"] for s in manifest["sources"].values())
    tokenizer = train_bpe(iter_texts(corpus_dir, "train"), vocab_size, max_token_length, length=n_docs)
    names = list(names)
    learned = single_token_names(tokenizer, names)
    missing = [n for n in names if n not in learned]
    if missing:
        tokenizer = force_single_tokens(tokenizer, [" " + n for n in missing], vocab_size)
    pool = single_token_names(tokenizer, names)
    female = [n for n in pool if n in FEMALE_POOL]
    male = [n for n in pool if n in MALE_POOL]
    if len(pool) < MIN_POOL or min(len(female), len(male)) < MIN_POOL_PER_GENDER:
        raise RuntimeError(f"only {len(pool)} pool names are single tokens ({female}, {male})")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_path))
    (out_path.parent / "name_pool.json").write_text(json.dumps(
        {"names": pool, "female": female, "male": male, "learned_by_bpe": learned,
         "forced": missing}, indent=2) + "\n")  # fmt: skip
    return as_transformers(tokenizer)


def tokenize_corpus(
    corpus_dir: str | Path = DEFAULT_ROOT / "corpus",
    tokenizer=DEFAULT_ROOT / "tokenizer.json",
    out_dir: str | Path = DEFAULT_ROOT / "tokens",
    batch_docs: int = 256,
) -> dict:
    """Write ``train.bin``, ``val.bin`` (uint16, ``<|endoftext|>`` before every document)
    and ``meta.json`` (per split and source: documents, tokens, ``[start, end)`` span)."""
    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    raw = raw_tokenizer(tokenizer)
    if raw.get_vocab_size() > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"vocabulary of {raw.get_vocab_size()} does not fit uint16")
    eot = raw.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"the tokenizer has no {EOT} token")
    sources = list(load_manifest(corpus_dir)["sources"])
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": "saelib-zoo-tokens/1", "dtype": "uint16", "eot_token_id": eot,
        "vocab_size": raw.get_vocab_size(), "layout": f"{EOT} before every document",
        "splits": {},
    }  # fmt: skip
    if isinstance(tokenizer, (str, Path)):
        meta["tokenizer_sha256"] = sha256_file(Path(tokenizer))
    for split in ("train", "val"):
        path = out_dir / f"{split}.bin"
        tmp = path.with_suffix(".bin.tmp")
        position = 0
        per_source = {}
        with open(tmp, "wb") as f:
            for source in sources:
                start, n_docs = position, 0
                batch: list[str] = []
                for text in [*iter_texts(corpus_dir, split, [source]), None]:
                    if text is not None:
                        batch.append(text)
                    if batch and (text is None or len(batch) == batch_docs):
                        for encoding in raw.encode_batch(batch, add_special_tokens=False):
                            ids = np.asarray([eot, *encoding.ids], dtype=np.uint16)
                            f.write(ids.tobytes())
                            position += len(ids)
                        n_docs += len(batch)
                        batch = []
                per_source[source] = {"docs": n_docs, "tokens": position - start,
                                      "start": start, "end": position}  # fmt: skip
        os.replace(tmp, path)
        meta["splits"][split] = {"tokens": position, "file": path.name, "sources": per_source}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def build_all(
    root: str | Path = DEFAULT_ROOT, stories_docs: int = DEFAULT_STORIES_DOCS,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> dict:
    """Corpus, tokenizer and token files under ``root``; returns timings and counts."""
    root = Path(root)
    timings = {}
    started = time.perf_counter()
    manifest = build_corpus(root / "corpus", stories_docs=stories_docs)
    timings["corpus_s"] = time.perf_counter() - started
    started = time.perf_counter()
    train_tokenizer(root / "corpus", root / "tokenizer.json", vocab_size)
    timings["tokenizer_s"] = time.perf_counter() - started
    started = time.perf_counter()
    meta = tokenize_corpus(root / "corpus", root / "tokenizer.json", root / "tokens")
    timings["tokenize_s"] = time.perf_counter() - started
    return {"timings": timings, "manifest": manifest, "tokens": meta}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Train the tokenizer and tokenize the corpus.")
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--with-corpus", action="store_true", help="(re)build the corpus first")
    parser.add_argument("--stories-docs", type=int, default=DEFAULT_STORIES_DOCS)
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.with_corpus:
        result = build_all(root, args.stories_docs, args.vocab_size)
        print(json.dumps(result["timings"], indent=2))
        return 0
    started = time.perf_counter()
    train_tokenizer(root / "corpus", root / "tokenizer.json", args.vocab_size)
    print(f"tokenizer: {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    meta = tokenize_corpus(root / "corpus", root / "tokenizer.json", root / "tokens")
    print(f"tokens: {time.perf_counter() - started:.1f} s, "
          f"train {meta['splits']['train']['tokens']:,}, val {meta['splits']['val']['tokens']:,}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
