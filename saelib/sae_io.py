"""SAE folders in SAELens's format: ``cfg.json`` + ``sae_weights.safetensors``.

    save_sae(sae, "saes/topk")        # SAELens 6 reads it completely, metadata included
    sae = load_sae("saes/topk")       # ours, or a folder SAELens (any version) wrote

Weights: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in]
and, for JumpReLU, ``threshold`` [d_sae].

``cfg.json`` is written in SAELens 6's layout: shape and run-time options at the top,
``metadata`` holding ``sae_lens_version``, ``model_name``, ``hook_name`` and the like, and
saelib's own extras under ``metadata.saelib``. The version key matters: SAELens 6 treats a
config without it as pre-6.0 and rebuilds ``metadata`` from top-level keys, which loses the
hook and model names.

``load_sae`` reads both layouts: SAELens 6 (``architecture`` standard / topk / jumprelu /
batchtopk, ``metadata`` dict) and pre-6.0 (``hook_point``, ``activation_fn_str``, TopK as
"standard" with ``activation_fn_str: "topk"`` and ``activation_fn_kwargs: {"k": ...}``).
Settings saelib cannot honour (run-time input normalisation, a head index, decoder-norm
rescaling, no b_dec subtraction, other architectures) are refused with ``SAEFormatError``
naming the field, never ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .files import content_digest, write_atomic, write_text_atomic
from .sae import SAEConfig, SparseAutoencoder, make_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT = "6.0.0"
"""The SAELens config layout we write (its ``metadata.sae_lens_version``): SAELens 6 reads
configs with a version of at least 6.0 as they are, and older ones through its converter."""

_TO_SAELENS = {"relu": "standard"}
_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}
# Top-level keys of pre-6.0 configs that SAELens 6 moves into ``metadata``.
_PRE6_METADATA_KEYS = ("model_name", "hook_name", "hook_head_index", "prepend_bos", "context_size",
                       "dataset_path", "model_from_pretrained_kwargs", "exclude_special_tokens", "neuronpedia_id")
_PRE6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                 "activation_fn_str": "activation_fn"}


class SAEFormatError(ValueError):
    """An SAE folder cannot be read as asked; the message names the file, the field and the remedy."""


def saelens_cfg(cfg: SAEConfig, architecture: str) -> dict:
    """``cfg.json`` contents in SAELens 6's layout (top-level shape, ``metadata`` dict)."""
    metadata = {
        "sae_lens_version": SAELENS_FORMAT,
        "sae_lens_training_version": None,
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_head_index": None,
        # Our models always see a BOS token first; SAEs are trained without its position.
        "prepend_bos": True,
        "saelib": cfg.metadata,
    }
    if "exclude_special_tokens" in cfg.metadata:
        metadata["exclude_special_tokens"] = cfg.metadata["exclude_special_tokens"]
    out = {
        "architecture": _TO_SAELENS.get(architecture, architecture),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",  # the trainer folds its input scale into the weights
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if architecture == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    return out


def save_sae(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` (each atomically) to ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in sae.weights_to_save().items()}
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise SAEFormatError(f"not saving {folder}: {', '.join(bad)} hold NaN or inf (a diverged run); retrain it")
    # the checksum rides in the file's own header, so weights and checksum are written in one step
    header = {DIGEST_KEY: content_digest(tensors)}
    write_atomic(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    write_text_atomic(folder / CFG_FILE, json.dumps(saelens_cfg(sae.cfg, sae.saved_architecture()), indent=1))
    return folder


def _is_pre6(raw: dict) -> bool:
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    if not version:
        return True
    try:
        return int(str(version).split(".")[0]) < 6
    except ValueError:
        return True


def read_saelens_cfg(raw: dict, where: str = "cfg.json") -> SAEConfig:
    """An ``SAEConfig`` from SAELens ``cfg.json`` contents (6.x or pre-6.0 layout); raises
    ``SAEFormatError`` (naming ``where``) for anything saelib would have to ignore."""
    raw = dict(raw)
    metadata = dict(raw.get("metadata") or {})
    if _is_pre6(raw):
        raw = {_PRE6_RENAMES.get(key, key): value for key, value in raw.items()}
        for key in _PRE6_METADATA_KEYS:
            if raw.get(key) is not None:
                metadata.setdefault(key, raw[key])

    def refuse(field: str, why: str) -> SAEFormatError:
        return SAEFormatError(f"{where}: {field}={raw.get(field, metadata.get(field))!r} {why}")

    architecture = raw.get("architecture", "standard")
    activation = raw.get("activation_fn", "relu")
    k = raw.get("k")
    if k is None:
        k = (raw.get("activation_fn_kwargs") or {}).get("k")
    if architecture == "standard" and activation == "topk":
        architecture = "topk"  # pre-6.0 TopK SAEs were "standard" with a topk activation
    elif architecture == "standard" and activation not in (None, "relu"):
        raise refuse("activation_fn", "is not supported: saelib reads ReLU and TopK activations")
    if architecture not in _FROM_SAELENS:
        raise refuse("architecture", f"is not supported; saelib reads {', '.join(_FROM_SAELENS)}")
    if architecture in ("topk", "batchtopk") and k is None:
        raise SAEFormatError(f"{where}: a {architecture} SAE needs k (top level or activation_fn_kwargs.k)")
    if not raw.get("apply_b_dec_to_input", True):
        raise refuse("apply_b_dec_to_input", "is not supported: saelib SAEs subtract b_dec from their input")
    if raw.get("normalize_activations") not in (None, False, "none"):
        raise refuse("normalize_activations", "means the SAE expects rescaled inputs; saelib SAEs take raw "
                     "activations: fold the scale into the weights first (SAELens: "
                     "sae.fold_activation_norm_scaling_factor(...)), then save again")
    if metadata.get("hook_head_index") is not None:
        raise SAEFormatError(f"{where}: hook_head_index={metadata['hook_head_index']!r} (an SAE on one attention "
                             "head) is not supported: saelib splices whole hook points")
    if raw.get("reshape_activations") not in (None, "none"):
        raise refuse("reshape_activations", "is not supported (saelib flattens head axes itself)")
    if raw.get("rescale_acts_by_decoder_norm"):
        raise refuse("rescale_acts_by_decoder_norm", "is not supported: saelib's latents are not rescaled by decoder norms")
    return SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        architecture=_FROM_SAELENS[architecture],
        k=int(k) if k is not None else 32,
        model_name=metadata.get("model_name") or "",
        hook_name=metadata.get("hook_name") or "",
        metadata=metadata.get("saelib") or {},
    )


def _batchtopk_threshold(tensors: dict, where: Path) -> dict:
    """SAELens's BatchTopK state holds ``topk_threshold`` (scalar) or one ``threshold`` per
    latent, all equal; ours holds one scalar."""
    value = tensors.get("topk_threshold", tensors.get("threshold"))
    if value is None:
        raise SAEFormatError(f"{where}: a batchtopk SAE needs a threshold tensor (threshold or topk_threshold)")
    value = value.reshape(-1).float()
    if not torch.all(value == value[0]):
        raise SAEFormatError(f"{where}: batchtopk thresholds differ between latents; load it as jumprelu")
    return {**tensors, "threshold": value[0]}


DIGEST_KEY = "saelib_content_sha256"
"""Key, in the safetensors header, of ``files.content_digest`` of the tensors (saelib's own
folders; SAELens's have none and are checked for non-finite values only)."""


def _read_weights(path: Path) -> dict:
    """The tensors of a weights file, refused with the file named when it is truncated, fails
    its checksum or holds NaN or inf."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise SAEFormatError(f"{path} cannot be read ({type(err).__name__}: {str(err)[:160]}): it is truncated or "
                             "damaged; save or download the SAE again") from None
    recorded = header.get(DIGEST_KEY)
    if recorded is not None and content_digest(tensors) != recorded:
        raise SAEFormatError(f"{path} fails its checksum (weights altered or damaged since saved): save or "
                             "train the SAE again")
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise SAEFormatError(f"{path}: {', '.join(bad)} hold NaN or inf; this SAE is unusable: retrain it")
    return tensors


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """An SAE from a SAELens-layout folder (ours or SAELens's, 6.x or pre-6.0)."""
    folder = Path(folder)
    if not (folder / CFG_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{folder} is not an SAE folder: it needs {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        raw = json.loads((folder / CFG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise SAEFormatError(f"{folder / CFG_FILE} is not valid JSON ({err}); save the SAE again") from None
    cfg = read_saelens_cfg(raw, where=str(folder / CFG_FILE))
    tensors = _read_weights(folder / WEIGHTS_FILE)
    if cfg.architecture == "batchtopk":
        tensors = _batchtopk_threshold(tensors, folder / WEIGHTS_FILE)
    sae = make_sae(cfg)
    expected = sae.weights_to_save()
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise SAEFormatError(f"{folder / WEIGHTS_FILE} lacks {missing}; it holds {sorted(tensors)}")
    with torch.no_grad():
        for name, tensor in expected.items():
            if cfg.architecture == "batchtopk" and name == "threshold":
                sae.threshold.copy_(tensors["threshold"])
                sae.threshold_started.fill_(True)
                continue
            if tensors[name].shape != tensor.shape:
                raise SAEFormatError(f"{folder / WEIGHTS_FILE}: {name} has shape {tuple(tensors[name].shape)}, "
                                     f"cfg.json implies {tuple(tensor.shape)}")
            tensor.copy_(tensors[name].float())
    return sae.to(device)
