import pandas as pd
import torch

from saelib.controls import RANDOM, RANDOM_REAL_EMBEDDINGS, TRAINED, control_models, token_specificity, token_variance_share
from saelib.harvest import model_label


def test_control_models_randomise_all_but_what_they_keep(tiny_model):
    variants = control_models(tiny_model, seed=0)
    assert list(variants) == [TRAINED, RANDOM, RANDOM_REAL_EMBEDDINGS]
    assert variants[TRAINED] is tiny_model
    trained = dict(tiny_model.named_parameters())
    for name, variant in variants.items():
        if name == TRAINED:
            continue
        # the embedding parameters by module: TransformerBridge names parameters after the model it wraps
        embedding = {id(p) for attr in ("embed", "pos_embed", "unembed") if getattr(variant, attr, None) is not None
                     for p in getattr(variant, attr).parameters()}
        assert embedding
        for param_name, param in variant.named_parameters():
            kept = name == RANDOM_REAL_EMBEDDINGS and id(param) in embedding
            assert torch.equal(param, trained[param_name]) == kept, (name, param_name)
    # each variant harvests into its own store folder
    assert len({model_label(v) for v in variants.values()}) == 3


def test_token_specificity_counts_single_token_features():
    tables = {
        "a": pd.DataFrame({"top_token_share": [1.0, 0.95, 0.2, 0.5], "token_entropy": [0.0, 0.1, 2.0, 1.0]}),
        "b": pd.DataFrame({"top_token_share": [0.3, 0.4], "token_entropy": [1.5, 2.5]}),
    }
    summary = token_specificity(tables, single_token_share=0.9)
    assert summary.loc["a", "single_token_features"] == 0.5 and summary.loc["b", "single_token_features"] == 0.0
    assert summary.loc["a", "median_token_entropy"] == 0.55 and summary.loc["b", "mean_token_entropy"] == 2.0
    assert summary.loc["a", "live_features"] == 4


def test_token_variance_share_is_one_for_a_function_of_the_token_and_small_for_noise():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (5000,), generator=generator).numpy()
    table = torch.randn(20, 8, generator=generator)
    assert abs(token_variance_share(table[tokens], tokens) - 1.0) < 1e-9
    noise = torch.randn(5000, 8, generator=generator)
    assert token_variance_share(noise, tokens) < 0.02  # 20 group means of 250 noise vectors each
    half = table[tokens] + noise * table.std()  # token part and noise of equal variance
    assert 0.35 < token_variance_share(half, tokens) < 0.65
