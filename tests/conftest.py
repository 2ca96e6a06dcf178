import pytest
import torch

from saelib.models import to_transformer_lens
from saelib.zoo.lm import LeanGPT, LMConfig


@pytest.fixture(scope="session")
def tiny_cfg() -> LMConfig:
    return LMConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=101)


@pytest.fixture(scope="session")
def tiny_lean(tiny_cfg) -> LeanGPT:
    torch.manual_seed(0)
    model = LeanGPT(tiny_cfg)
    with torch.no_grad():  # non-zero biases and gains, so a wrong mapping cannot hide
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith(("b_Q", "b_K", "b_V")):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_lean, tiny_cfg):
    """A random-init stand-in (not the embedded model), as a ``HookedTransformer`` or a
    ``TransformerBridge`` as ``SAELIB_TL_BACKEND`` and the installed TransformerLens choose."""
    return to_transformer_lens(tiny_lean.state_dict(), tiny_cfg)


@pytest.fixture(scope="session")
def embedded():
    """The shipped embedded model (loads offline in a few seconds)."""
    from saelib.models import load_model

    return load_model("embedded", device="cpu")


@pytest.fixture
def always_busy(monkeypatch):
    """Machine-load readings (``saelib.threads.OtherCpuLoad``) that always report another
    process on a whole core; yields the list of thread counts set meanwhile, from 2
    threads at the start (the count before is put back after)."""
    import saelib.threads

    monkeypatch.setattr(saelib.threads.OtherCpuLoad, "open", classmethod(lambda cls, **kw: lambda: 1.0))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    counts = []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (counts.append(n), set_threads(n))[1])
    yield counts
    set_threads(before)
