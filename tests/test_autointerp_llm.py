"""The OpenAI-compatible client, explainer and simulator against a real HTTP server on
127.0.0.1 (tests/llm_server.py): answers, expected values from logprobs, the cache, retries on
429/5xx, garbage replies recorded per feature, unreachable servers and refused requests."""

import socket

import numpy as np
import pytest
import torch

from llm_server import FakeChatServer
from saelib.autointerp.llm import (ChatClient, LLMConfig, LLMExplainer, LLMRequestError, LLMSimulator,
                                   LLMUnavailableError)
from saelib.autointerp.patterns import Vocabulary
from saelib.autointerp.pipeline import score_feature, score_features
from saelib.autointerp.planted import noise, on_token, planted_activations
from saelib.store import StoreManifest
from saelib.store_writer import StoreWriter

WORDS = [" cat", " dog", " the", " a", " sat", " on", " mat", ",", ".", "\n", " 'quoted'", " ran", " big", " red",
         " blue", " and", " of", " it", " was", " then"]
CONTEXT_LEN = 17


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    contexts = np.random.default_rng(0).integers(0, len(WORDS), size=(80, CONTEXT_LEN)).astype(np.int32)
    manifest = StoreManifest(model="toy", model_fingerprint="0", hook="h", d_in=1, dtype="float32", shard_rows=4096,
                             context_len=CONTEXT_LEN, n_contexts=len(contexts), first_position=1, contexts_sha256="")
    writer = StoreWriter(tmp_path_factory.mktemp("store"), manifest, contexts)
    writer.append(torch.zeros(len(contexts) * (CONTEXT_LEN - 1), 1))
    return planted_activations(writer.close(), [on_token(0), noise(0.05, seed=3)])


SIZES = dict(n_explain=4, n_score_top=3, n_bands=2, per_band=1, n_non_activating=3)


def llm_pair(server, tmp_path, **config):
    client = ChatClient(LLMConfig(base_url=server.base_url, model="fake", api_key="k", backoff_s=0.01,
                                  cache_dir=str(tmp_path / "cache"), **config))
    vocabulary = Vocabulary(WORDS)
    return client, LLMExplainer(client, vocabulary), LLMSimulator(client, vocabulary)


def test_llm_explains_and_simulates_with_expected_values_from_logprobs(acts, tmp_path):
    with FakeChatServer(confidence=0.9) as server:
        client, explainer, simulator = llm_pair(server, tmp_path)
        score = score_feature(acts, 0, explainer, simulator, **SIZES)
        assert score.explanation == "the token ' cat'" and score.failure == ""  # planted values vary 1..2: r < 1
        assert score.correlation > 0.9 and score.detection == 1.0 and score.fuzzing == 1.0
        tokens_SL = np.array([[0, 1, 0]])
        # Expected values: 0.9·10 + 0.1·0 at ' cat', 0.9·0 + 0.1·10 elsewhere, not the written 10 / 0.
        np.testing.assert_allclose(simulator.simulate(score.explanation, tokens_SL), [[9.0, 1.0, 9.0]], atol=1e-5)
        request = server.requests[-1]
        assert request["model"] == "fake" and request["logprobs"] is True and request["top_logprobs"] == 10
    assert client.usage.prompt_tokens == 100 * client.usage.requests and client.usage.cache_hits == 0


def test_without_logprobs_the_written_numbers_are_used(acts, tmp_path):
    with FakeChatServer(logprobs=False) as server:
        _, _, simulator = llm_pair(server, tmp_path)
        assert simulator.simulate("the token ' cat'", np.array([[0, 1]])).tolist() == [[10.0, 0.0]]


def test_a_rerun_is_answered_from_the_cache(acts, tmp_path):
    with FakeChatServer() as server:
        first_client, explainer, simulator = llm_pair(server, tmp_path)
        first = score_feature(acts, 0, explainer, simulator, **SIZES)
        sent = len(server.requests)
        assert sent > 1
        client, explainer, simulator = llm_pair(server, tmp_path)
        again = score_feature(acts, 0, explainer, simulator, **SIZES)
        assert len(server.requests) == sent and client.usage.requests == 0 and client.usage.cache_hits == sent
        assert again == first


def test_429_and_500_are_retried_with_backoff(acts, tmp_path):
    with FakeChatServer() as server:
        server.faults = [429, 500, 503]
        client, explainer, _ = llm_pair(server, tmp_path)
        assert explainer.explain(np.array([[0, 1]]), np.array([[1.0, 0.0]])) == "the token ' cat'"
        assert client.usage.requests == 4 and len(server.requests) == 4


def test_a_server_that_keeps_failing_stops_the_run_with_a_clear_error(tmp_path):
    with FakeChatServer() as server:
        server.faults = [500] * 10
        _, explainer, _ = llm_pair(server, tmp_path, max_retries=2)
        with pytest.raises(LLMUnavailableError, match=r"no answer from http://127\.0\.0\.1:\d+/v1/chat/completions "
                                                      r"after 3 tries \(last: HTTP 500"):
            explainer.explain(np.array([[0]]), np.array([[1.0]]))


def test_an_unreachable_server_is_named(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff_s=0.01,
                                  cache_dir=""))
    with pytest.raises(LLMUnavailableError, match=f"127.0.0.1:{port}.*Connection refused.*SAELIB_LLM_BASE_URL"):
        LLMExplainer(client, Vocabulary(WORDS)).explain(np.array([[0]]), np.array([[1.0]]))


def test_a_refused_request_is_not_retried(tmp_path):
    with FakeChatServer() as server:
        server.faults = [401]
        client, explainer, _ = llm_pair(server, tmp_path)
        with pytest.raises(LLMRequestError, match="HTTP 401.*API key"):
            explainer.explain(np.array([[0]]), np.array([[1.0]]))
        assert client.usage.requests == 1


def test_garbage_costs_one_feature_not_the_run(acts, tmp_path):
    with FakeChatServer() as server:
        server.faults = ["garbage"]  # the first feature's explainer request
        _, explainer, simulator = llm_pair(server, tmp_path)
        scores = score_features(acts, [0, 0 + 1], explainer, simulator, progress=False, **SIZES)
        assert "not a chat completion" in scores.failure[0] and np.isnan(scores.correlation[0])
        assert scores.failure[1] == "" and not np.isnan(scores.correlation[1])
        server.faults = ["nonsense"] * 2  # a simulator reply with no numbers in it
        nonsense = score_feature(acts, 0, explainer, simulator, seed=5, **SIZES)
        assert "gives no activation" in nonsense.failure
