"""The shipped embedded model (data/) loads offline and shows the behaviours the
notebooks rely on; fast versions of the model card's probes."""

import json

import numpy as np
import pytest
import torch

from saelib.models import load_model
from saelib.paths import data_dir
from saelib.ioi import ioi_logit_diffs, ioi_prompts, model_single_token_names
from saelib.zoo.probes import induction_losses


def test_loads_with_the_network_blocked(monkeypatch):
    """Every socket connection and name look-up fails: loading must not need either."""
    import socket

    def no_network(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(OSError, match="blocked"):  # the block holds
        socket.create_connection(("127.0.0.1", 9))
    model = load_model("embedded", device="cpu")
    assert model.to_string(model.to_tokens("Call me Ishmael.")[0, 1:]) == "Call me Ishmael."


def test_loads_with_its_tokenizer(embedded):
    assert embedded.cfg.n_layers >= 4
    assert embedded.tokenizer.bos_token_id == 0
    tokens = embedded.to_tokens("Call me Ishmael.")
    assert tokens[0, 0].item() == embedded.tokenizer.bos_token_id
    assert embedded.to_string(tokens[0, 1:]) == "Call me Ishmael."


def test_weights_are_safetensors_only():
    names = {p.name for p in data_dir().iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".pt", ".pth", ".bin", ".pkl")) for n in names)


@pytest.mark.parametrize("name, min_tokens", [("tokens_sample.npy", 2_000_000), ("tokens_heldout.npy", 200_000)])
def test_token_files_hold_text_the_model_predicts(embedded, name, min_tokens):
    tokens = np.load(data_dir() / name)
    assert tokens.dtype == np.uint16 and tokens.ndim == 2 and tokens.size >= min_tokens
    assert (tokens[:, 0] == 0).all() and tokens.max() < embedded.cfg.d_vocab
    with torch.no_grad():
        loss = embedded(torch.from_numpy(tokens[::97][:16].astype(np.int64)), return_type="loss").item()
    assert loss < 5.0, loss  # far below the uniform 9.0 nats


def test_induction_on_repeated_random_tokens(embedded):
    # the model card's bar (a model without induction heads scores ~0.97)
    result = induction_losses(embedded, seq_len=40, n_seqs=8)
    assert result.ratio <= 0.5, result


def test_indirect_object_identification(embedded):
    names = model_single_token_names(embedded, json.loads((data_dir() / "name_pool.json").read_text())["names"])
    assert len(names) >= 20
    # the model card's 200 prompts: the bar is >= 80% positive, so fewer prompts would make it coarse
    diffs = ioi_logit_diffs(embedded, ioi_prompts(names, n_prompts=200, seed=0))
    assert diffs.mean() >= 1.0 and (diffs > 0).float().mean() >= 0.8, diffs
