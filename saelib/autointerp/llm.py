"""An optional LLM explainer and simulator over any OpenAI-compatible chat-completions server
(OpenAI, vLLM, ollama, llama.cpp's server...), standard library only.

    client = ChatClient(LLMConfig(base_url="http://127.0.0.1:8000/v1", model="llama-3-8b"))
    explainer, simulator = LLMExplainer(client, vocabulary), LLMSimulator(client, vocabulary)
    score_features(acts, features, explainer, simulator)

Prompts follow Bills et al. (2023): the explainer sees ``token<TAB>activation`` lines with
activations scaled to integers 0..10 and completes "the main thing this neuron does is
find ..."; the simulator sees the explanation and the numbered tokens of one text and
answers ``index: activation`` per token. When the server returns ``top_logprobs`` the
prediction at each token is the expected value over the 0..10 answers (Bills's
"all at once" method); otherwise the numbers as written.

Every reply is cached on disk under a hash of the request (URL, model, messages,
parameters), so a rerun costs nothing. 429, 5xx, timeouts and dropped connections are
retried with exponential backoff (``Retry-After`` honoured); a refused connection is not
(nothing listens there). An unreachable server raises ``LLMUnavailableError`` (stops the
run: nothing would succeed); a reply that cannot be read raises ``LLMReplyError``, which
``score_features`` records as that feature's failure and moves on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import write_json_atomic
from .pipeline import AutointerpFailure


class LLMUnavailableError(RuntimeError):
    """The server cannot be reached or keeps failing; the message says which URL and what to check."""


class LLMRequestError(RuntimeError):
    """The server refused the request itself (bad key, unknown model...): retrying cannot help."""


class LLMReplyError(AutointerpFailure):
    """A reply that is not the expected JSON or text; costs one feature, not the run."""


def _env(*names: str, default: str | None = None) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return default


@dataclass
class LLMConfig:
    """Where and how to ask. Unset fields come from the environment (``SAELIB_LLM_*``, then
    the OpenAI client's ``OPENAI_*`` names)."""

    base_url: str = field(default_factory=lambda: _env("SAELIB_LLM_BASE_URL", "OPENAI_BASE_URL",
                                                        default="https://api.openai.com/v1"))
    """Server root ending in ``/v1``; ``/chat/completions`` is appended."""
    model: str = field(default_factory=lambda: _env("SAELIB_LLM_MODEL", default="gpt-4o-mini"))
    """Model name as the server knows it."""
    api_key: str | None = field(default_factory=lambda: _env("SAELIB_LLM_API_KEY", "OPENAI_API_KEY"), repr=False)
    """Bearer token (local servers usually need none)."""
    timeout_s: float = 60.0
    """Per request."""
    max_retries: int = 5
    """Retries after a 429, a 5xx or a dropped connection, with exponential backoff."""
    backoff_s: float = 1.0
    """First wait; doubled after each retry (a server's ``Retry-After`` wins when longer)."""
    cache_dir: str | None = field(default_factory=lambda: _env("SAELIB_LLM_CACHE"))
    """Folder of cached replies (default: ``<artifacts>/llm_cache``); "" turns caching off."""
    logprobs: bool = True
    """Ask for ``top_logprobs`` to simulate by expected value; servers that refuse it get plain text."""
    usd_per_million_prompt_tokens: float = 0.0
    """For the cost counter (0: not counted)."""
    usd_per_million_completion_tokens: float = 0.0


@dataclass
class Usage:
    """What a client has spent."""

    requests: int = 0
    """Requests sent to the server (retries included)."""
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0


class ChatClient:
    """One OpenAI-compatible chat-completions endpoint, with cache, retries and a usage counter."""

    def __init__(self, config: LLMConfig | None = None):
        self.config = config or LLMConfig()
        self.usage = Usage()
        if self.config.cache_dir is None:
            from ..paths import artifacts_dir

            self.cache = artifacts_dir() / "llm_cache"
        else:
            self.cache = Path(self.config.cache_dir) if self.config.cache_dir else None

    @property
    def url(self) -> str:
        return self.config.base_url.rstrip("/") + "/chat/completions"

    def complete(self, messages: list[dict], **params) -> dict:
        """The server's JSON reply to ``messages`` (``params``: temperature, max_tokens, ...)."""
        body = {"model": self.config.model, "messages": messages, **params}
        key = hashlib.sha256(json.dumps({"url": self.url, **body}, sort_keys=True).encode()).hexdigest()
        cached = self.cache / key[:2] / f"{key}.json" if self.cache else None
        if cached is not None and cached.exists():
            try:
                reply = json.loads(cached.read_text())
                self.usage.cache_hits += 1
                return reply
            except (OSError, json.JSONDecodeError):
                pass  # a damaged cache entry is asked again and rewritten
        reply = self._post(body)
        usage = reply.get("usage") or {}
        self.usage.prompt_tokens += int(usage.get("prompt_tokens") or 0)
        self.usage.completion_tokens += int(usage.get("completion_tokens") or 0)
        self.usage.usd += (int(usage.get("prompt_tokens") or 0) * self.config.usd_per_million_prompt_tokens
                           + int(usage.get("completion_tokens") or 0) * self.config.usd_per_million_completion_tokens) / 1e6
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cached, reply)
        return reply

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        wait, last_problem = self.config.backoff_s, ""
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                time.sleep(wait)
                wait *= 2
            self.usage.requests += 1
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, data, headers),
                                            timeout=self.config.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as error:
                detail = error.read()[:200].decode(errors="replace")
                if error.code == 429 or error.code >= 500:
                    last_problem = f"HTTP {error.code} {detail!r}"
                    retry_after = error.headers.get("Retry-After")
                    if retry_after and retry_after.replace(".", "", 1).isdigit():
                        wait = max(wait, min(float(retry_after), 60.0))
                    continue
                raise LLMRequestError(f"{self.url} refused the request with HTTP {error.code}: {detail!r} "
                                      "(check the API key, the model name and the base URL)") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                reason = getattr(error, "reason", error)
                last_problem = f"{type(error).__name__}: {reason}"
                if isinstance(reason, ConnectionRefusedError):
                    break  # nothing listens there: waiting will not change that
                continue
            try:
                reply = json.loads(raw)
                reply["choices"][0]["message"]
                return reply
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
                raise LLMReplyError(f"{self.url} answered with something that is not a chat completion: "
                                    f"{raw[:120]!r}") from None
        raise LLMUnavailableError(f"no answer from {self.url} after {attempt + 1} tries "
                                  f"(last: {last_problem}); is the server running and the base URL right? "
                                  "Set SAELIB_LLM_BASE_URL, or use the offline explainer")


def _text(reply: dict) -> str:
    content = reply["choices"][0]["message"].get("content")
    if not isinstance(content, str) or not content.strip():
        raise LLMReplyError("the reply has no text content")
    return content


def _shown(token: str) -> str:
    """A token as the prompts show it: quoted, whitespace visible."""
    return repr(token)


EXPLAINER_SYSTEM = (
    "We are studying neurons in a neural network. Each neuron looks for one particular thing in a short "
    "text. Look at the tokens where the neuron activates and say, in one short sentence, what it is looking "
    "for; do not just list words.\n\nActivations are given as token<TAB>activation, one token per line, "
    "scaled 0 to 10: 0 means no activation, higher values a stronger match."
)
EXPLAINER_ENDING = "Explanation of the neuron: the main thing this neuron does is find"


class LLMExplainer:
    """Bills et al.'s explainer prompt over ``client`` (``vocabulary``: token strings by id)."""

    name = "LLM"

    def __init__(self, client: ChatClient, vocabulary, max_tokens: int = 60):
        self.client, self.vocabulary, self.max_tokens = client, vocabulary, max_tokens

    def explain(self, tokens_SL: np.ndarray, activations_SL: np.ndarray) -> str:
        top = float(np.max(activations_SL)) if np.size(activations_SL) else 0.0
        scale = 10.0 / top if top > 0 else 0.0
        blocks = []
        for tokens_L, acts_L in zip(tokens_SL, activations_SL):
            lines = [f"{_shown(self.vocabulary.strings[t])}\t{int(round(a * scale))}" for t, a in zip(tokens_L, acts_L)]
            blocks.append("<start>\n" + "\n".join(lines) + "\n<end>")
        prompt = ("Neuron activations:\n" + "\n\n".join(blocks) + f"\n\n{EXPLAINER_ENDING} ... (reply with the "
                  "rest of that sentence only)")
        reply = self.client.complete([{"role": "system", "content": EXPLAINER_SYSTEM},
                                      {"role": "user", "content": prompt}], temperature=0, max_tokens=self.max_tokens)
        text = _text(reply).strip().removeprefix(EXPLAINER_ENDING).strip()
        quoted = len(text) > 1 and text[0] == text[-1] == '"' and '"' not in text[1:-1]
        return text[1:-1] if quoted else text  # a reply wrapped in quotes, not one ending in a quoted token


SIMULATOR_SYSTEM = (
    "We are studying neurons in a neural network. Each neuron looks for one particular thing in a short "
    "text. Given an explanation of what a neuron looks for, predict its activation at every token of a "
    "text, as an integer from 0 (none) to 10 (strongest)."
)
_ANSWER = re.compile(r"^\s*(\d+)\s*:\s*(\d+(?:\.\d+)?)\s*$", re.M)


class LLMSimulator:
    """Bills et al.'s simulator over ``client``: one request per text, answered as
    ``index: activation`` lines; expected values from ``top_logprobs`` where the server gives them."""

    name = "LLM"
    fires_at = 5.0
    """Detection and fuzzing count a token as firing from this expected value on: with
    logprobs the prediction is rarely exactly 0, so the scale's midpoint, not 1."""

    def __init__(self, client: ChatClient, vocabulary):
        self.client, self.vocabulary = client, vocabulary

    def simulate(self, explanation: str, tokens_SL: np.ndarray) -> np.ndarray:
        return np.stack([self._one(explanation, tokens_L) for tokens_L in np.asarray(tokens_SL)])

    def _one(self, explanation: str, tokens_L: np.ndarray) -> np.ndarray:
        listing = "\n".join(f"{i}\t{_shown(self.vocabulary.strings[t])}" for i, t in enumerate(tokens_L))
        prompt = (f"Explanation: the main thing this neuron does is find {explanation}\n\nText, one token per line "
                  f"as index<TAB>token:\n{listing}\n\nAnswer with exactly {len(tokens_L)} lines, one per token in "
                  "order, each as index: activation")
        params = {"temperature": 0, "max_tokens": 8 * len(tokens_L) + 16}
        if self.client.config.logprobs:
            params.update(logprobs=True, top_logprobs=10)
        reply = self.client.complete([{"role": "system", "content": SIMULATOR_SYSTEM},
                                      {"role": "user", "content": prompt}], **params)
        predicted = _expected_values(reply, len(tokens_L))
        if predicted is None:
            predicted = _written_values(_text(reply), len(tokens_L))
        return predicted


def _written_values(text: str, n: int) -> np.ndarray:
    found = {int(i): float(v) for i, v in _ANSWER.findall(text)}
    if not all(i in found for i in range(n)):
        missing = [i for i in range(n) if i not in found]
        raise LLMReplyError(f"the simulator's reply gives no activation for {len(missing)} of {n} tokens "
                            f"(first: {missing[:5]}); reply began {text[:80]!r}")
    return np.clip(np.array([found[i] for i in range(n)], dtype=np.float32), 0, 10)


def _as_activation(token: str) -> int | None:
    token = token.strip()
    return int(token) if token.isdigit() and int(token) <= 10 else None


def _expected_values(reply: dict, n: int) -> np.ndarray | None:
    """Per token, the expected activation under the server's top_logprobs at each answer
    (the token right after ``index:``); None when the reply has no usable logprobs."""
    content = ((reply["choices"][0].get("logprobs") or {}).get("content")) or []
    values, line = {}, ""
    for item in content:
        token = item.get("token", "")
        if line.rstrip().endswith(":") and _as_activation(token) is not None:
            index = re.match(r"\s*(\d+)", line)
            weights = {}
            for option in item.get("top_logprobs") or [{"token": token, "logprob": item.get("logprob", 0.0)}]:
                value = _as_activation(option.get("token", ""))
                if value is not None:
                    weights[value] = weights.get(value, 0.0) + math.exp(option.get("logprob", -math.inf))
            if index and weights:
                values[int(index.group(1))] = sum(v * w for v, w in weights.items()) / sum(weights.values())
        line = (line + token).rsplit("\n", 1)[-1]
    if not all(i in values for i in range(n)):
        return None
    return np.array([values[i] for i in range(n)], dtype=np.float32)
