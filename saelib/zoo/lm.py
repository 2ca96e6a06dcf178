"""A lean GPT twin of TransformerLens's ``HookedTransformer`` for fast training.

``HookedTransformer`` wraps every activation in a hook point and computes attention
head by head, which makes it about twice as slow to train on a CPU as it needs to be.
``LeanGPT`` computes the same function with fused attention and a fused loss, and keeps
TransformerLens's parameter names and shapes, so its ``state_dict`` loads straight into
a ``HookedTransformer`` (``to_hooked_transformer``) with matching logits.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LMConfig:
    """Shape of a GPT-style language model (pre-LayerNorm)."""

    n_layers: int = 4
    """Number of transformer blocks."""
    d_model: int = 256
    """Width of the residual stream."""
    n_heads: int = 8
    """Attention heads per block."""
    d_head: int = 32
    """Width of each head's queries, keys and values."""
    d_mlp: int = 1024
    """Hidden width of each MLP."""
    n_ctx: int = 256
    """Longest sequence, BOS included."""
    d_vocab: int = 8192
    """Tokenizer vocabulary size."""
    act_fn: str = "gelu"
    """MLP non-linearity; exact GELU, as TransformerLens's ``"gelu"``."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weight matrices."""
    positional_embedding_type: str = "standard"
    """``"standard"``: learned absolute position vectors added to the residual stream.
    ``"rotary"``: queries and keys rotated by position (GPT-NeoX style, all of ``d_head``),
    so attention scores depend on relative position and no position vector enters the
    residual stream."""
    rotary_base: int = 10000
    """Base of the rotary frequencies (used with ``"rotary"`` only)."""

    def __post_init__(self):
        if self.positional_embedding_type not in ("standard", "rotary"):
            raise ValueError(f"positional_embedding_type {self.positional_embedding_type!r}: use 'standard' or 'rotary'")
        if self.positional_embedding_type == "rotary" and self.d_head % 2:
            raise ValueError(f"rotary positions need an even d_head, not {self.d_head}")

    @property
    def rotary(self) -> bool:
        return self.positional_embedding_type == "rotary"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "LMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LMConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def hooked_config(self, device: str | torch.device = "cpu"):
        """The equivalent ``HookedTransformerConfig`` (LayerNorm kept unfolded)."""
        from transformer_lens import HookedTransformerConfig

        return HookedTransformerConfig(
            n_layers=self.n_layers,
            d_model=self.d_model,
            n_heads=self.n_heads,
            d_head=self.d_head,
            d_mlp=self.d_mlp,
            n_ctx=self.n_ctx,
            d_vocab=self.d_vocab,
            act_fn=self.act_fn,
            normalization_type="LN",
            positional_embedding_type=self.positional_embedding_type,
            rotary_dim=self.d_head if self.rotary else None,
            rotary_base=self.rotary_base,
            rotary_adjacent_pairs=False,
            original_architecture="saelib-embedded",
            model_name="saelib-embedded",
            default_prepend_bos=True,
            device=str(device),
        )


class _LayerNorm(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TransformerLens's LayerNorm uses eps=1e-5 and the biased variance, as F.layer_norm.
        return F.layer_norm(x, x.shape[-1:], self.w, self.b, eps=1e-5)


def rotary_cos_sin(n_ctx: int, d_head: int, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, [n_ctx, d_head] each; dimension i pairs with
    i + d_head/2 (GPT-NeoX layout, as TransformerLens with ``rotary_adjacent_pairs=False``)."""
    inverse_freq = base ** (-torch.arange(d_head // 2, dtype=torch.float32) / (d_head // 2))
    angles = torch.arange(n_ctx, dtype=torch.float32)[:, None] * inverse_freq.repeat(2)[None, :]
    return angles.cos(), angles.sin()


def rotate(x_BHSE: torch.Tensor, cos_SE: torch.Tensor, sin_SE: torch.Tensor) -> torch.Tensor:
    """Rotate each (i, i + E/2) pair of query or key coordinates by its position's angle."""
    first, second = x_BHSE.chunk(2, dim=-1)
    return x_BHSE * cos_SE + torch.cat([-second, first], dim=-1) * sin_SE


class _Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        if cfg.rotary:
            cos, sin = rotary_cos_sin(cfg.n_ctx, cfg.d_head, cfg.rotary_base)
            # not in the state_dict: derived from the config, like TransformerLens's buffers
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.rotary = cfg.rotary
        H, D, E = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q = nn.Parameter(torch.empty(H, D, E))
        self.W_K = nn.Parameter(torch.empty(H, D, E))
        self.W_V = nn.Parameter(torch.empty(H, D, E))
        self.W_O = nn.Parameter(torch.empty(H, E, D))
        self.b_Q = nn.Parameter(torch.zeros(H, E))
        self.b_K = nn.Parameter(torch.zeros(H, E))
        self.b_V = nn.Parameter(torch.zeros(H, E))
        self.b_O = nn.Parameter(torch.zeros(D))

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        W_qkv = torch.cat([self.W_Q, self.W_K, self.W_V], dim=0)  # [3H, D, E]
        b_qkv = torch.cat([self.b_Q, self.b_K, self.b_V], dim=0)  # [3H, E]
        qkv_B3HSE = torch.einsum("bsd,hde->bhse", x_BSD, W_qkv) + b_qkv[None, :, None, :]
        q, k, v = qkv_B3HSE.chunk(3, dim=1)
        if self.rotary:
            S = x_BSD.shape[1]
            cos, sin = self.rotary_cos[:S].to(q.dtype), self.rotary_sin[:S].to(q.dtype)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        z_BHSE = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.einsum("bhse,hed->bsd", z_BHSE, self.W_O) + self.b_O


class _MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        if cfg.act_fn not in ("gelu", "gelu_new", "relu"):
            raise ValueError(f"act_fn {cfg.act_fn!r} not supported; use 'gelu', 'gelu_new' or 'relu'")
        self.act_fn = cfg.act_fn

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        pre = torch.addmm(self.b_in, x_BSD.flatten(0, 1), self.W_in)
        if self.act_fn == "relu":
            post = F.relu(pre)
        else:
            post = F.gelu(pre, approximate="tanh" if self.act_fn == "gelu_new" else "none")
        return torch.addmm(self.b_out, post, self.W_out).view_as(x_BSD)


class _Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.ln1 = _LayerNorm(cfg.d_model)
        self.attn = _Attention(cfg)
        self.ln2 = _LayerNorm(cfg.d_model)
        self.mlp = _MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _Embed(nn.Module):
    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model))


class _PosEmbed(nn.Module):
    def __init__(self, n_ctx: int, d_model: int):
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(n_ctx, d_model))


class _Unembed(nn.Module):
    def __init__(self, d_model: int, d_vocab: int):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(d_model, d_vocab))
        self.b_U = nn.Parameter(torch.zeros(d_vocab))


class LeanGPT(nn.Module):
    """GPT with TransformerLens parameter names; ``forward(tokens_BS) -> logits_BSV``."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = _Embed(cfg.d_vocab, cfg.d_model)
        if not cfg.rotary:
            self.pos_embed = _PosEmbed(cfg.n_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = _LayerNorm(cfg.d_model)
        self.unembed = _Unembed(cfg.d_model, cfg.d_vocab)
        self.reset_parameters_()

    @torch.no_grad()
    def reset_parameters_(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std) weights, output projections scaled down by depth (GPT-2 style)."""
        out_std = self.cfg.init_std / (2 * self.cfg.n_layers) ** 0.5
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("b_") or leaf == "b":
                p.zero_()
            elif leaf == "w":
                p.fill_(1.0)
            elif leaf in ("W_O", "W_out"):
                p.normal_(0.0, out_std, generator=generator)
            else:
                p.normal_(0.0, self.cfg.init_std, generator=generator)

    def residual(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """Final residual stream after ``ln_final``: [batch, seq, d_model]."""
        S = tokens_BS.shape[1]
        if S > self.cfg.n_ctx:
            raise ValueError(f"sequence length {S} exceeds n_ctx={self.cfg.n_ctx}")
        x = self.embed.W_E[tokens_BS]
        if not self.cfg.rotary:
            x = x + self.pos_embed.W_pos[:S]
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return self.residual(tokens_BS) @ self.unembed.W_U + self.unembed.b_U

    def loss(self, tokens_BS: torch.Tensor, loss_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy (nats) over positions 0..S-2 (optionally masked)."""
        logits = self.forward(tokens_BS[:, :-1])
        targets = tokens_BS[:, 1:]
        if loss_mask_BS is None:
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        mask = loss_mask_BS[:, 1:].flatten().to(per_token.dtype)
        return (per_token * mask).sum() / mask.sum().clamp_min(1.0)


def to_hooked_transformer(state_dict: dict, cfg: LMConfig, tokenizer=None, device="cpu"):
    """Load LeanGPT weights into an (unprocessed) ``HookedTransformer`` (TransformerLens 3.x)."""
    from transformer_lens import HookedTransformer

    model = HookedTransformer(cfg.hooked_config(device), tokenizer=tokenizer, move_to_device=True)
    try:
        missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in state_dict.items()}, strict=False)
    except RuntimeError as err:  # size mismatches
        raise ValueError(f"weights do not match the config: {err}") from None
    # HookedTransformer keeps its causal mask, IGNORE value and rotary tables as buffers;
    # nothing else may be missing.
    real_missing = [k for k in missing if not k.endswith((".mask", ".IGNORE", ".rotary_sin", ".rotary_cos"))]
    if real_missing or unexpected:
        raise ValueError(f"weights do not match the config: missing {real_missing}, unexpected {unexpected}")
    model.eval()
    return model


def halves_to_adjacent_pairs(d_head: int) -> torch.Tensor:
    """Index map from our rotary layout (dimension i pairs with i + d_head/2) to the
    adjacent-pair layout ((2i, 2i+1) rotate together) of TransformerBridge's native model:
    new dimension 2i is old i, new 2i+1 is old i + d_head/2. A query-key dot product is
    unchanged when queries and keys are permuted alike."""
    half = d_head // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)


def bridge_state_dict(state_dict: dict, cfg: LMConfig) -> dict:
    """LeanGPT / ``HookedTransformer`` weights in the layout of TransformerBridge's native
    model (``nn.Linear`` [out, in] weights, heads flattened, rotary pairs adjacent)."""
    H, E = cfg.n_heads, cfg.d_head
    order = halves_to_adjacent_pairs(E) if cfg.rotary else torch.arange(E)
    out = {"embed.weight": state_dict["embed.W_E"]}
    if not cfg.rotary:
        out["pos_embed.weight"] = state_dict["pos_embed.W_pos"]
    for layer in range(cfg.n_layers):
        tl, br = f"blocks.{layer}.", f"blocks.{layer}."
        for norm in ("ln1", "ln2"):
            out[f"{br}{norm}.weight"] = state_dict[f"{tl}{norm}.w"]
            out[f"{br}{norm}.bias"] = state_dict[f"{tl}{norm}.b"]
        for name in ("Q", "K", "V"):
            W_HDE, b_HE = state_dict[f"{tl}attn.W_{name}"], state_dict[f"{tl}attn.b_{name}"]
            if name in ("Q", "K"):  # only queries and keys are rotated
                W_HDE, b_HE = W_HDE[..., order], b_HE[..., order]
            out[f"{br}attn.{name.lower()}.weight"] = W_HDE.permute(0, 2, 1).reshape(H * E, -1)
            out[f"{br}attn.{name.lower()}.bias"] = b_HE.reshape(H * E)
        out[f"{br}attn.o.weight"] = state_dict[f"{tl}attn.W_O"].reshape(H * E, -1).T
        out[f"{br}attn.o.bias"] = state_dict[f"{tl}attn.b_O"]
        out[f"{br}mlp.in.weight"] = state_dict[f"{tl}mlp.W_in"].T
        out[f"{br}mlp.in.bias"] = state_dict[f"{tl}mlp.b_in"]
        out[f"{br}mlp.out.weight"] = state_dict[f"{tl}mlp.W_out"].T
        out[f"{br}mlp.out.bias"] = state_dict[f"{tl}mlp.b_out"]
    out["ln_final.weight"] = state_dict["ln_final.w"]
    out["ln_final.bias"] = state_dict["ln_final.b"]
    out["unembed.weight"] = state_dict["unembed.W_U"].T
    out["unembed.bias"] = state_dict["unembed.b_U"]
    return {k: v.contiguous() for k, v in out.items()}


def transformer_bridge_class():
    """TransformerLens's ``TransformerBridge`` with its ``boot_*`` constructors attached
    (TransformerLens 4 attaches them when its ``sources`` package is imported)."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        import transformer_lens.model_bridge.sources  # noqa: F401
    except ImportError:  # 3.9 defines them on the class itself
        pass
    return TransformerBridge


def to_transformer_bridge(state_dict: dict, cfg: LMConfig, tokenizer=None, device="cpu"):
    """Load LeanGPT weights into a TransformerLens ``TransformerBridge`` (3.9 and 4.x) built
    natively from the config, in compatibility mode with no weight processing: the same
    hook names and the same activations as ``to_hooked_transformer``, except that
    ``hook_q``/``hook_k`` list each head's dimensions in adjacent-pair order."""
    native = dict(
        n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_head=cfg.d_head, d_mlp=cfg.d_mlp,
        n_ctx=cfg.n_ctx, d_vocab=cfg.d_vocab, act_fn=cfg.act_fn, normalization_type="LN",
        positional_embedding_type=cfg.positional_embedding_type, default_prepend_bos=True,
    )
    if cfg.rotary:
        native.update(rotary_dim=cfg.d_head, rotary_base=cfg.rotary_base)
    model = transformer_bridge_class().boot_native(native, tokenizer=tokenizer, device=device, dtype=torch.float32,
                                          model_name="saelib-embedded")
    try:
        model.load_state_dict({k: v.to(device) for k, v in bridge_state_dict(state_dict, cfg).items()}, strict=True)
    except (KeyError, RuntimeError) as err:
        raise ValueError(f"weights do not match the config: {err}") from None
    model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    model.eval()
    return model
