"""The embedded model as a standard Hugging Face ``transformers`` checkpoint (GPT-NeoX).

Our model is a sequential pre-LayerNorm transformer with rotary positions, biases
everywhere and a bias on the unembedding. GPT-NeoX with ``use_parallel_residual=False``
has all of it except the unembedding bias (``embed_out`` has none), and no standard
architecture has all of it. The bias is carried exactly by widening the residual stream:

- ``k = n_heads`` extra residual dimensions (so ``hidden_size = d_model + n_heads`` stays a
  multiple of the head count, each head one dimension wider) always hold the mean of the
  ``d_model`` real ones: the embedding and every attention and MLP output write their own
  mean there (the mean is linear, so it is a few more rows of the same matrices);
- a LayerNorm over ``d + k`` dimensions then sees the same mean and a variance scaled by
  ``d / (d + k)``, undone by scaling its gain by ``sqrt(d / (d + k))`` and its epsilon by
  ``d / (d + k)``; on the extra dimensions it outputs its bias, zero except in the final
  LayerNorm, where extra dimension 0 outputs 1 and the unembedding's column there is our
  unembedding bias;
- each head's extra query/key/value dimension is zero (so it changes no score and no
  output) and queries are scaled by ``sqrt((d_head + 1) / d_head)`` to undo GPT-NeoX's
  ``1 / sqrt(head_size)``; rotary positions cover the first ``d_head`` dimensions of each
  head, rotating i with i + d_head/2 as ours do.

The logits equal ours to float error (tests check 1e-4). Activations seen through this
checkpoint have ``d_model + n_heads`` dimensions; saelib itself loads ``"embedded"`` in its
own width.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .lm import LMConfig

LN_EPS = 1e-5  # as TransformerLens and our LayerNorm
OUTPUT_EMBEDDING = "embed_out.weight"
"""GPT-NeoX's unembedding in checkpoints; ``save_gpt_neox`` renames it to whatever the
installed ``transformers`` calls it (``lm_head`` in 5.x)."""


def gpt_neox_config(cfg: LMConfig, **extra):
    """The ``GPTNeoXConfig`` of the widened model."""
    from transformers import GPTNeoXConfig

    if not cfg.rotary:
        raise ValueError("the GPT-NeoX export needs a model with rotary positions (positional_embedding_type='rotary')")
    d, k = cfg.d_model, cfg.n_heads
    return GPTNeoXConfig(
        vocab_size=cfg.d_vocab, hidden_size=d + k, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_mlp, hidden_act="gelu" if cfg.act_fn == "gelu" else cfg.act_fn,
        rotary_pct=cfg.d_head / (cfg.d_head + 1), rotary_emb_base=cfg.rotary_base,
        max_position_embeddings=cfg.n_ctx, layer_norm_eps=LN_EPS * d / (d + k), use_parallel_residual=False,
        attention_bias=True, tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0,
        architectures=["GPTNeoXForCausalLM"], **extra)


def gpt_neox_state_dict(state_dict: dict, cfg: LMConfig) -> dict:
    """Our (TransformerLens-named) weights as a widened ``GPTNeoXForCausalLM`` state dict."""
    d, k, H, E = cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.d_head
    gain = math.sqrt(d / (d + k))
    sd = {n: v.detach().float().cpu() for n, v in state_dict.items()}

    def with_mean_rows(W_OD: torch.Tensor) -> torch.Tensor:
        """[out=d, ...] -> [d + k, ...]: the k new outputs are the mean of the d real ones."""
        return torch.cat([W_OD, W_OD.mean(0, keepdim=True).expand(k, *W_OD.shape[1:])], dim=0)

    def zero_cols(W_XD: torch.Tensor) -> torch.Tensor:
        """[out, in=d] -> [out, d + k]: nothing is read from the extra dimensions."""
        return torch.cat([W_XD, W_XD.new_zeros(W_XD.shape[0], k)], dim=1)

    def norm(prefix: str, w: torch.Tensor, b: torch.Tensor, extra_bias: torch.Tensor | None = None) -> dict:
        extra = extra_bias if extra_bias is not None else b.new_zeros(k)
        return {f"{prefix}.weight": torch.cat([w * gain, w.new_zeros(k)]), f"{prefix}.bias": torch.cat([b, extra])}

    out = {"gpt_neox.embed_in.weight": with_mean_rows(sd["embed.W_E"].T).T}
    q_scale = math.sqrt((E + 1) / E)
    for layer in range(cfg.n_layers):
        tl, hf = f"blocks.{layer}.", f"gpt_neox.layers.{layer}."
        out.update(norm(hf + "input_layernorm", sd[tl + "ln1.w"], sd[tl + "ln1.b"]))
        out.update(norm(hf + "post_attention_layernorm", sd[tl + "ln2.w"], sd[tl + "ln2.b"]))
        # query_key_value rows are laid out head by head: [q_h, k_h, v_h], each E + 1 wide.
        weight = torch.zeros(H, 3, E + 1, d + k)
        bias = torch.zeros(H, 3, E + 1)
        for i, name in enumerate("QKV"):
            W_HDE, b_HE = sd[f"{tl}attn.W_{name}"], sd[f"{tl}attn.b_{name}"]
            scale = q_scale if name == "Q" else 1.0
            weight[:, i, :E, :d] = W_HDE.permute(0, 2, 1) * scale
            bias[:, i, :E] = b_HE * scale
        out[hf + "attention.query_key_value.weight"] = weight.reshape(3 * (d + k), d + k)
        out[hf + "attention.query_key_value.bias"] = bias.reshape(3 * (d + k))
        W_O = torch.zeros(H, E + 1, d)
        W_O[:, :E] = sd[tl + "attn.W_O"]
        out[hf + "attention.dense.weight"] = with_mean_rows(W_O.reshape(H * (E + 1), d).T)
        out[hf + "attention.dense.bias"] = with_mean_rows(sd[tl + "attn.b_O"])
        out[hf + "mlp.dense_h_to_4h.weight"] = zero_cols(sd[tl + "mlp.W_in"].T)
        out[hf + "mlp.dense_h_to_4h.bias"] = sd[tl + "mlp.b_in"]
        out[hf + "mlp.dense_4h_to_h.weight"] = with_mean_rows(sd[tl + "mlp.W_out"].T)
        out[hf + "mlp.dense_4h_to_h.bias"] = with_mean_rows(sd[tl + "mlp.b_out"])
    one_hot = torch.zeros(k)
    one_hot[0] = 1.0  # the final LayerNorm's constant output that carries the unembedding bias
    out.update(norm("gpt_neox.final_layer_norm", sd["ln_final.w"], sd["ln_final.b"], one_hot))
    W_U_VD = sd["unembed.W_U"].T
    extra = torch.zeros(W_U_VD.shape[0], k)
    extra[:, 0] = sd["unembed.b_U"]
    out[OUTPUT_EMBEDDING] = torch.cat([W_U_VD, extra], dim=1)
    return {n: v.contiguous() for n, v in out.items()}


def save_gpt_neox(state_dict: dict, cfg: LMConfig, tokenizer, folder: str | Path) -> Path:
    """Write a ``transformers`` checkpoint folder (config.json, model.safetensors, tokenizer)."""
    from transformers import GPTNeoXForCausalLM

    folder = Path(folder)
    config = gpt_neox_config(cfg, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPTNeoXForCausalLM(config)
    weights = gpt_neox_state_dict(state_dict, cfg)
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    weights[f"{head}.weight"] = weights.pop(OUTPUT_EMBEDDING)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [n for n in missing if not n.endswith("inv_freq")]
    if missing or unexpected:
        raise ValueError(f"GPT-NeoX export does not match transformers' model: missing {missing}, unexpected {unexpected}")
    model.eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def export_embedded_to_hf(folder: str | Path) -> Path:
    """The shipped embedded model (``data/``) as a GPT-NeoX checkpoint folder."""
    from safetensors.torch import load_file

    from ..paths import data_dir
    from .tokenizer import load_tokenizer

    data = data_dir()
    return save_gpt_neox(load_file(data / "model.safetensors"), LMConfig.load(data / "config.json"),
                         load_tokenizer(data / "tokenizer.json"), folder)
