"""Real architectures from a local folder, as a machine with no network gets them: tiny random
GPT-2 and GPT-NeoX checkpoints written by ``transformers`` load through TransformerLens's own
conversion with the Hugging Face model's predictions, and bad folders are refused by name."""

import pytest
import torch

from saelib.data import token_windows
from saelib.harvest import harvest_sample
from saelib.models import (
    UnknownModelError,
    has_hooked_transformer,
    is_local_path,
    load_model,
    model_signature,
    signatures_match,
)
from saelib.zoo.checkpoints import make_checkpoint, train_small_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_small_tokenizer(vocab_size=1024, n_windows=200)


@pytest.fixture(scope="module", params=["gpt2", "gpt_neox"])
def checkpoint(request, tokenizer, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, tokenizer=tokenizer)


def test_folder_loads_with_the_hugging_face_models_predictions(checkpoint, tokenizer):
    from transformers import AutoModelForCausalLM

    model = load_model(str(checkpoint), device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, use_safetensors=True).eval()
    tokens = model.to_tokens("The whale swam past the ship, and Ishmael watched it go.")
    # TransformerLens's convention per architecture: GPT-2 with BOS, GPT-NeoX (Pythia) without
    assert bool(tokens[0, 0] == tokenizer.bos_token_id) == model.cfg.default_prepend_bos and tokens.shape[1] > 8
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)  # the unembedding is centred: compare log-probabilities
        theirs = reference(tokens).logits.log_softmax(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert model.cfg.n_layers == 2 and "blocks.1.hook_resid_post" in model.hook_dict


@pytest.mark.skipif(not has_hooked_transformer(), reason="TransformerLens 4 has no HookedTransformer to compare with")
def test_both_backends_see_the_same_activations(checkpoint):
    hooked = load_model(str(checkpoint), device="cpu", backend="hooked")
    bridge = load_model(str(checkpoint), device="cpu", backend="bridge")
    hooks = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.1.mlp.hook_post",
             "blocks.1.hook_resid_post"]
    tokens = hooked.to_tokens("The whale swam past the ship, and Ishmael watched it go.")
    assert torch.equal(bridge.to_tokens("The whale swam past the ship, and Ishmael watched it go."), tokens)
    with torch.no_grad():
        _, hooked_cache = hooked.run_with_cache(tokens, names_filter=hooks)
        _, bridge_cache = bridge.run_with_cache(tokens, names_filter=hooks)
    for hook in hooks:  # the same load-time processing (LayerNorm folded, writing weights centred)
        torch.testing.assert_close(bridge_cache[hook], hooked_cache[hook], atol=1e-4, rtol=1e-4, msg=hook)
    assert signatures_match(model_signature(bridge), model_signature(hooked))


def test_shipped_text_is_retokenised_for_the_folders_tokenizer(checkpoint, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_ARTIFACTS", str(tmp_path))
    model = load_model(str(checkpoint), device="cpu")
    windows = token_windows(model, 16 * 64, context_len=64, seed=0)
    assert windows.shape == (16, 64) and int(windows.max()) < len(tokenizer)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    text = tokenizer.decode(windows[0, 1:].tolist())
    assert len(text) > 100 and "\ufffd" not in text[10:-10]  # real text, cut at token boundaries
    store = harvest_sample(model, ["blocks.0.hook_resid_post"], 16 * 64, context_len=64)["blocks.0.hook_resid_post"]
    assert store.d_in == model.cfg.d_model and len(store) == 16 * 63


def test_bad_folders_are_refused_by_name(tmp_path, checkpoint):
    assert is_local_path("./x") and is_local_path(str(tmp_path)) and not is_local_path("EleutherAI/pythia-70m")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((checkpoint / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin, which saelib does not load"):
        load_model(str(pickled))
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ["config.json", "model.safetensors"]:
        (no_tokenizer / name).write_bytes((checkpoint / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_model(str(no_tokenizer))


BACKENDS = ["bridge"] + (["hooked"] if has_hooked_transformer() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_architecture_transformer_lens_cannot_convert_is_named(tmp_path, tokenizer, backend):
    # BioGPT: a causal LM transformers has and neither TransformerLens line converts
    from transformers import BioGptConfig, BioGptForCausalLM

    config = BioGptConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=64)
    BioGptForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnknownModelError, match=f"{tmp_path.name}.*BioGptForCausalLM"):
        load_model(str(tmp_path), device="cpu", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pretrained_name_loads_from_a_filled_cache_offline(tmp_path, tokenizer, backend):
    # The hub cache as a download leaves it (snapshots/<commit>/ + refs/main), here filled with a
    # random GPT-NeoX checkpoint under Pythia's name; HF_HUB_OFFLINE=1 is read at import, so
    # the load runs in a fresh process, as a user's would.
    import shutil
    import subprocess
    import sys

    source = make_checkpoint(tmp_path / "source", "gpt_neox", tokenizer=tokenizer)
    repo = tmp_path / "hf" / "hub" / "models--EleutherAI--pythia-14m"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    probe = ("import torch; from saelib.models import load_model, is_bridge; m = load_model('pythia-14m', device='cpu'); "
             "t = m.to_tokens('The whale swam past the ship.'); "
             "print(type(m).__name__, m.cfg.d_model, float(m(t).log_softmax(-1)[0, -1, :50].sum()))")
    env = {**__import__("os").environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "SAELIB_TL_BACKEND": backend}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    name, width, logprob_sum = run.stdout.split()[-3:]
    assert name == ("TransformerBridge" if backend == "bridge" else "HookedTransformer") and int(width) == 64
    folder = load_model(str(source), device="cpu", backend=backend)  # the same weights from the folder
    with torch.no_grad():
        expected = folder(folder.to_tokens("The whale swam past the ship.")).log_softmax(-1)[0, -1, :50].sum()
    assert abs(float(logprob_sum) - float(expected)) < 1e-3
