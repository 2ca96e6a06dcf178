"""Load language models through TransformerLens, and check hook names.

One small adapter serves both TransformerLens lines: ``HookedTransformer`` (3.x) and
``TransformerBridge`` in compatibility mode (3.9 and 4.x; 4.0 removed ``HookedTransformer``).
Both expose the same hook names (``blocks.2.hook_resid_post``), ``run_with_hooks``,
``run_with_cache``, ``to_tokens`` and ``cfg``, which is all the rest of saelib uses. The
backend is ``HookedTransformer`` where it exists and the bridge otherwise;
``SAELIB_TL_BACKEND=bridge`` (or ``backend="bridge"``) picks the bridge on 3.9 too.

``load_model`` takes one of three things:

- ``"embedded"``: the small model shipped in ``data/`` (no network);
- a local Hugging Face checkpoint folder (``config.json``, safetensors weights and a
  tokenizer), e.g. one saved with ``save_pretrained`` on a machine with no network: loaded
  through TransformerLens's own conversion for that architecture, exactly as a download is;
- a TransformerLens pretrained name (``"pythia-70m-deduped"``, ``"gpt2"``): downloads weights
  from the Hugging Face hub once (or reads its cache, also with ``HF_HUB_OFFLINE=1``) and
  fails with a clear message when it cannot.

``randomize_weights`` builds the random-weight controls of notebook 08.
"""

from __future__ import annotations

import copy
import difflib
import os
import socket
from pathlib import Path

import torch

from .paths import data_dir
from .zoo.lm import LMConfig, to_hooked_transformer, to_transformer_bridge, transformer_bridge_class
from .zoo.tokenizer import load_tokenizer

EMBEDDED = "embedded"
EMBEDDED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class ModelNeedsNetworkError(RuntimeError):
    """A pretrained model's weights are not cached and the hub cannot be reached."""


class UnknownModelError(ValueError):
    """The model name is neither ``"embedded"`` nor a TransformerLens pretrained name."""


class UnknownHookError(KeyError):
    """A hook name the model does not have."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


BACKEND_ENV = "SAELIB_TL_BACKEND"
BACKENDS = ("hooked", "bridge")


def transformer_lens_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformer-lens")
    except PackageNotFoundError:
        return "unknown"


def has_hooked_transformer() -> bool:
    """True where TransformerLens still has ``HookedTransformer`` (the 3.x line)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def tl_backend(backend: str | None = None) -> str:
    """The model class to load into: ``"hooked"`` (``HookedTransformer``) or ``"bridge"``
    (``TransformerBridge``). ``backend`` or ``$SAELIB_TL_BACKEND``; unset or ``"auto"`` means
    ``HookedTransformer`` where it exists, else the bridge."""
    choice = (backend or os.environ.get(BACKEND_ENV, "") or "auto").strip().lower()
    if choice not in BACKENDS + ("auto",):
        raise ValueError(f"TransformerLens backend {choice!r} (from {'backend=' if backend else BACKEND_ENV}): "
                         f"use one of {', '.join(BACKENDS)} or auto")
    if choice == "auto":
        return "hooked" if has_hooked_transformer() else "bridge"
    if choice == "hooked" and not has_hooked_transformer():
        raise ImportError(f"TransformerLens {transformer_lens_version()} has no HookedTransformer (removed in 4.0): "
                          f"use the bridge backend (unset {BACKEND_ENV} or set it to 'bridge')")
    return choice


def load_model(name: str = EMBEDDED, device: str | None = None, backend: str | None = None):
    """A TransformerLens model in eval mode: a ``HookedTransformer`` or a ``TransformerBridge``
    in compatibility mode (see ``tl_backend``), with the same hook names either way.

    ``name``: ``"embedded"`` for the model in ``data/``, a local checkpoint folder, or a
    TransformerLens pretrained name such as ``"pythia-70m-deduped"`` or ``"gpt2"`` (needs
    network access once).
    """
    device = device or _default_device()
    backend = tl_backend(backend)
    name = str(name)
    if name == EMBEDDED:
        return load_embedded(device=device, backend=backend)
    if is_local_path(name):
        return load_checkpoint_folder(name, device=device, backend=backend)
    return load_pretrained(name, device=device, backend=backend)


def is_bridge(model) -> bool:
    """True for a ``TransformerBridge`` (as opposed to a ``HookedTransformer``)."""
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


def is_local_path(name: str) -> bool:
    """True when ``name`` means a folder on disk: it exists, or is written as a path
    (absolute, ``./``, ``../``, ``~``), not as a hub name such as ``EleutherAI/pythia-70m``."""
    return Path(name).expanduser().exists() or name.startswith(("/", "./", "../", "~"))


RANDOM_STAND_IN_FLAG = "saelib_random_weights"
"""Set in the config.json of ``saelib.zoo.checkpoints`` folders: random weights, for testing only."""


def is_random_stand_in(name: str) -> bool:
    """True for a checkpoint folder written by ``saelib.zoo.checkpoints`` (random weights): a
    stand-in for a real model's *format*, about whose language skills nothing can be claimed."""
    import json

    if not name or name == EMBEDDED or not is_local_path(str(name)):
        return False
    config = Path(name).expanduser() / "config.json"
    try:
        return bool(json.loads(config.read_text()).get(RANDOM_STAND_IN_FLAG))
    except (OSError, ValueError):
        return False


CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
SUPPORTED_HINT = ("saelib reads a folder through TransformerLens, so use an architecture it supports "
                  "(GPT-2, GPT-NeoX/Pythia, GPT-Neo, Llama, Mistral, Gemma, OPT, ...)")


def _first_sentence(err: Exception) -> str:
    """The start of an error message (TransformerBridge's lists every architecture it knows)."""
    text = str(err).strip()
    return text.split(". ")[0].rstrip(".")[:200]


def load_checkpoint_folder(folder: str | Path, device: str = "cpu", backend: str | None = None):
    """A Hugging Face causal-LM checkpoint folder as a TransformerLens model (either backend):
    the weights are read by ``transformers`` (safetensors only) and converted by TransformerLens's
    loader for that architecture, with the same weight processing as ``from_pretrained`` (LayerNorm
    folded, writing weights and unembedding centred), so hook names and activations are
    those of the downloaded model."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist (MODEL names a folder on disk, an existing "
                                "checkpoint saved with save_pretrained, or use 'embedded' / a pretrained name)")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a Hugging Face checkpoint folder "
                                "(save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder))")
    if not any((folder / f).exists() for f in CHECKPOINT_WEIGHTS):
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        raise FileNotFoundError(
            f"{folder} has no safetensors weights ({' or '.join(CHECKPOINT_WEIGHTS)})"
            + (f"; it has {', '.join(pickles)}, which saelib does not load (pickles can run code): re-save with "
               "model.save_pretrained(folder, safe_serialization=True)" if pickles else ""))
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}): "
                                "save it beside the weights with tokenizer.save_pretrained(folder)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                    torch_dtype=torch.float32)
    architecture = (hf_model.config.architectures or [type(hf_model).__name__])[0]
    if tl_backend(backend) == "bridge":
        try:
            model = transformer_bridge_class().boot_transformers(str(folder), hf_model=hf_model, tokenizer=tokenizer,
                                                            device=device)
        except (NotImplementedError, ValueError, KeyError) as err:
            raise UnknownModelError(f"{folder}: TransformerLens {transformer_lens_version()} TransformerBridge cannot "
                                    f"load architecture {architecture} ({_first_sentence(err)}); {SUPPORTED_HINT}") from None
        # HookedTransformer's load-time processing (LayerNorm folded, writing weights and
        # unembedding centred), so activations match the HookedTransformer path.
        model.enable_compatibility_mode(disable_warnings=True)
        return model.eval()
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    try:
        cfg = loading.get_pretrained_model_config(str(folder), fold_ln=True, device=device, local_files_only=True)
        state_dict = loading.get_pretrained_state_dict(str(folder), cfg, hf_model)
    except (NotImplementedError, ValueError, KeyError) as err:
        raise UnknownModelError(f"{folder}: TransformerLens {transformer_lens_version()} cannot "
                                f"convert architecture {architecture} ({_first_sentence(err)}); {SUPPORTED_HINT}") from None
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=True, center_writing_weights=True, center_unembed=True,
                                      fold_value_biases=True)
    model.move_model_modules_to_device()
    return model.eval()


def load_embedded(device: str = "cpu", backend: str | None = None):
    """The project's own small model from ``data/`` (safetensors weights, never pickles)."""
    folder = data_dir()
    missing = [f for f in EMBEDDED_FILES if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"the embedded model is incomplete: {', '.join(missing)} missing in {folder}. "
            "A fresh clone ships these files; if you removed them, restore them with "
            "`git checkout -- data/` or rebuild them as README.md says (`python -m saelib zoo corpus`, "
            "`zoo train`, `zoo export`)."
        )
    from safetensors.torch import load_file

    cfg = LMConfig.load(folder / "config.json")
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    return to_transformer_lens(load_file(folder / "model.safetensors"), cfg, tokenizer, device, backend)


def to_transformer_lens(state_dict: dict, cfg: LMConfig, tokenizer=None, device: str = "cpu",
                        backend: str | None = None):
    """LeanGPT / embedded-model weights as a TransformerLens model of the chosen backend."""
    load = to_hooked_transformer if tl_backend(backend) == "hooked" else to_transformer_bridge
    return load(state_dict, cfg, tokenizer, device)


def _suggest(name: str, candidates, n: int = 3) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_pretrained(name: str, device: str = "cpu", backend: str | None = None):
    """A TransformerLens pretrained model, with clear errors for unknown names and no network."""
    try:  # TransformerLens 4 moved the name list out of the deleted loading module
        from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES, get_official_model_name
    except ImportError:
        from transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES, get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        short_names = [n.split("/")[-1] for n in OFFICIAL_MODEL_NAMES]
        raise UnknownModelError(
            f"unknown model {name!r}: use 'embedded' or a TransformerLens pretrained name "
            f"(e.g. 'pythia-70m-deduped', 'gpt2').{_suggest(name, short_names + [EMBEDDED])}"
        ) from None
    try:
        if tl_backend(backend) == "bridge":
            model = transformer_bridge_class().boot_transformers(official, device=device)
            model.enable_compatibility_mode(disable_warnings=True)
            return model.eval()
        from transformer_lens import HookedTransformer

        return HookedTransformer.from_pretrained(official, device=device)
    except Exception as err:  # the hub client raises many types when offline
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or not _hub_reachable()
        if offline:
            raise ModelNeedsNetworkError(
                f"{name!r} needs network access to download weights from the Hugging Face hub, "
                "and they are not cached here; use MODEL='embedded' (the model shipped in data/) "
                "or run once where the hub is reachable."
            ) from err
        raise


def check_hook_name(model, hook_name: str) -> str:
    """Return ``hook_name`` if ``model`` has it, else raise ``UnknownHookError`` naming the closest."""
    names = list(model.hook_dict)
    if hook_name in names:
        return hook_name
    per_block = sorted({n.split(".", 2)[2] for n in names if n.startswith("blocks.0.")})
    raise UnknownHookError(
        f"unknown hook name {hook_name!r} for this {model.cfg.n_layers}-layer model.{_suggest(hook_name, names)} "
        f"Valid names are 'blocks.<layer>.<point>' with layer 0..{model.cfg.n_layers - 1} and point one of: "
        f"{', '.join(per_block)}; or one of: {', '.join(n for n in names if not n.startswith('blocks.'))}."
    )


def hook_layer(hook_name: str) -> int | None:
    """Block index of a hook name (``blocks.3.hook_resid_post`` -> 3); ``None`` outside blocks."""
    parts = hook_name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit() else None


_EMBEDDING_MODULES = ("embed", "pos_embed", "unembed")


def initialised_model(name: str = EMBEDDED, seed: int = 0, device: str | None = None, backend: str | None = None):
    """The architecture of model ``name`` with its own initialisation, as a step-0 checkpoint
    of its training would be: the re-initialised control of Heap et al. (2025). Unlike
    ``randomize_weights`` (which redraws each tensor from the *trained* tensor's mean and
    spread), nothing of the trained weights is kept, not even their scale.

    The embedded model gets ``LeanGPT``'s initialisation (the one it was trained from); a
    checkpoint folder or pretrained name gets ``transformers``' ``from_config`` initialisation
    for its architecture, converted exactly as the trained weights are. Its ``cfg.model_name``
    is ``<name>-init<seed>``, so its stores never share a folder with the trained model's."""
    import tempfile

    from .paths import path_label

    device = device or _default_device()
    name = str(name)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        if name == EMBEDDED:
            from .zoo.lm import LeanGPT

            cfg = LMConfig.load(data_dir() / "config.json")
            lean = LeanGPT(cfg)
            lean.reset_parameters_(torch.Generator().manual_seed(seed))
            model = to_transformer_lens(lean.state_dict(), cfg, load_tokenizer(data_dir() / "tokenizer.json"), device,
                                        backend)
            label = EMBEDDED
        else:
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

            source = str(Path(name).expanduser().resolve()) if is_local_path(name) else _official_name(name)
            hf_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
            with tempfile.TemporaryDirectory() as folder:
                hf_model.save_pretrained(folder, safe_serialization=True)
                AutoTokenizer.from_pretrained(source).save_pretrained(folder)
                model = load_checkpoint_folder(folder, device=device, backend=backend)
            label = path_label(name)
    model.cfg.model_name = f"{label}-init{seed}"
    return model


def _official_name(name: str) -> str:
    try:  # TransformerLens 4 moved the name list out of the deleted loading module
        from transformer_lens.supported_models import get_official_model_name
    except ImportError:
        from transformer_lens.loading_from_pretrained import get_official_model_name
    try:
        return get_official_model_name(name)
    except ValueError:
        raise UnknownModelError(f"unknown model {name!r}: use 'embedded', a checkpoint folder or a TransformerLens "
                                "pretrained name") from None


@torch.no_grad()
def randomize_weights(model, keep_embeddings: bool = False, seed: int = 0):
    """A copy of ``model`` with every weight tensor redrawn at random (the random-weights control).

    Each tensor is resampled i.i.d. from a normal with the trained tensor's own mean and
    standard deviation, so activations keep their scale while all learned structure is
    gone. ``keep_embeddings=True`` keeps the trained token/position embeddings and
    unembedding (the "re-randomised with real embeddings" variant).
    """
    clone = copy.deepcopy(model)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # Found by module, not by parameter name: TransformerBridge names its parameters after the
    # wrapped model (tok_embed._original_component.weight), HookedTransformer after itself.
    kept = {id(p) for attr in _EMBEDDING_MODULES if getattr(clone, attr, None) is not None
            for p in getattr(clone, attr).parameters()} if keep_embeddings else set()
    for name, param in clone.named_parameters():
        if id(param) in kept:
            continue
        mean, std = param.float().mean(), param.float().std() if param.numel() > 1 else torch.tensor(0.0)
        fresh = torch.randn(param.shape, generator=generator) * std + mean
        param.copy_(fresh.to(param.dtype))
    return clone


@torch.no_grad()
def model_fingerprint(model) -> str:
    """A short hash of a model's shape and weights: equal for the same weights, different for a
    retrained or re-randomised model. Activation stores record it to catch model mix-ups."""
    import hashlib

    digest = hashlib.sha256()
    cfg = model.cfg
    digest.update(f"{cfg.n_layers}/{cfg.d_model}/{cfg.d_vocab}/{cfg.n_heads}/{cfg.d_mlp}".encode())
    for name, param in sorted(model.state_dict().items()):
        if name.endswith((".mask", ".IGNORE")):
            continue
        # A strided sample of each tensor is enough to tell models apart and stays fast for GPT-2.
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256]
        digest.update(name.encode())
        digest.update(sample.to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


SIGNATURE_POSITIONS = 8
SIGNATURE_TOKENS = 8
SIGNATURE_TOLERANCE = 1e-3
"""Largest difference (nats) between two signatures of one model: the backends and devices
differ by ~1e-5, models that differ at all by far more."""


@torch.no_grad()
def model_signature(model) -> list[float]:
    """What the model computes, in 64 numbers: log-probabilities of 8 fixed vocabulary ids at
    the first 8 positions of a fixed pseudo-random token sequence.

    ``model_fingerprint`` hashes the weights as this backend holds them, so the same model
    loaded as a ``HookedTransformer`` and as a ``TransformerBridge`` (or with LayerNorm
    folded) hashes differently; the signature is equal to float error (``same_model``)."""
    cfg = model.cfg
    n = min(SIGNATURE_POSITIONS, cfg.n_ctx)
    generator = torch.Generator().manual_seed(1234)
    tokens_1S = torch.randint(0, cfg.d_vocab, (1, n), generator=generator)
    vocab_ids = torch.randint(0, cfg.d_vocab, (SIGNATURE_TOKENS,), generator=generator)
    logits_SV = model(tokens_1S.to(cfg.device), return_type="logits")[0].float()
    logprobs = torch.log_softmax(logits_SV, dim=-1)[:, vocab_ids.to(logits_SV.device)]
    return [round(float(v), 6) for v in logprobs.flatten().cpu()]


def same_model(model, fingerprint: str, signature: list[float] | None = None) -> bool:
    """True when ``model`` is the model recorded as ``fingerprint`` (and ``signature``):
    the weights hash equal, or, across backends, the signatures agree to
    ``SIGNATURE_TOLERANCE``. Records without a signature need the exact hash."""
    if model_fingerprint(model) == fingerprint:
        return True
    return signatures_match(model_signature(model), signature)


def signatures_match(a: list[float] | None, b: list[float] | None) -> bool:
    if not a or not b or len(a) != len(b):
        return False
    return max(abs(x - y) for x, y in zip(a, b)) <= SIGNATURE_TOLERANCE
