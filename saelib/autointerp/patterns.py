"""The offline explainer and simulator: token patterns learned from examples, in the spirit
of Neuron-to-Graph (Foote et al. 2023), written as a short readable explanation.

An explanation is a list of *clauses*, each a pattern with a strength from 1 to 10::

    fires on ' the' after ' of' (10); ' a' (6); any token after ' in' (3); tokens after '(' until ')' (4)

- ``'X'``: the current token is X;
- ``'X' after 'P'``: the current token is X and the one before it P;
- ``any token after 'P'``: the token before is P (a wildcard for the current one);
- ``tokens after 'A' until 'B'``: A occurred earlier in the text and no B since (B itself
  excluded: "inside parentheses" is ``tokens after '(' until ')'``); ``tokens anywhere after
  'A'`` has no closing token.

The **explainer** (``PatternExplainer.explain``) sees only the explain set: token windows
with the feature's activation at every token. It proposes clauses from the tokens at and
before the activating positions, then adds, greedily, the clause that most raises the
Pearson correlation between the explanation's prediction and the true activations, until
no clause adds ``min_gain``. A clause's strength is the mean activation where it matches,
scaled so the feature's largest activation in the explain set is 10.

The **simulator** (``PatternSimulator.simulate``) reads only the explanation's *text*:
it parses the clauses and predicts, at each token, the strength of the strongest clause
that matches (0 where none does). So what is scored is exactly the string a person reads,
as with an LLM simulator.

Token windows are ``[S, L]`` arrays of token ids; the simulator compares token *strings*
(``vocabulary``: the decoded text of every id), so an explanation names tokens as text.
"""

from __future__ import annotations

import ast
import re
from typing import NamedTuple

import numpy as np

KINDS = ("token", "bigram", "after", "since")
NO_TOKEN = -1


class Clause(NamedTuple):
    kind: str
    """One of ``KINDS``: token, bigram (token after token), after (any token after), since."""
    token: str | None
    """The current token (token, bigram)."""
    before: str | None
    """The previous token (bigram, after) or the opening token (since)."""
    until: str | None
    """The closing token of a ``since`` clause (None: none)."""
    strength: int
    """1..10."""

    def text(self) -> str:
        if self.kind == "token":
            body = repr(self.token)
        elif self.kind == "bigram":
            body = f"{self.token!r} after {self.before!r}"
        elif self.kind == "after":
            body = f"any token after {self.before!r}"
        elif self.until is not None:
            body = f"tokens after {self.before!r} until {self.until!r}"
        else:
            body = f"tokens anywhere after {self.before!r}"
        return f"{body} ({self.strength})"


PREFIX = "fires on "
NOTHING = "fires on nothing recognisable"


def render(clauses: list[Clause]) -> str:
    """The explanation text of ``clauses``."""
    return PREFIX + "; ".join(c.text() for c in clauses) if clauses else NOTHING


_STR = r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
_CLAUSES = [
    ("after", re.compile(rf"any token after {_STR} \((\d+)\)")),
    ("since", re.compile(rf"tokens after {_STR} until {_STR} \((\d+)\)")),
    ("since", re.compile(rf"tokens anywhere after {_STR} \((\d+)\)")),
    ("bigram", re.compile(rf"{_STR} after {_STR} \((\d+)\)")),
    ("token", re.compile(rf"{_STR} \((\d+)\)")),
]


class ExplanationSyntaxError(ValueError):
    """An explanation text that the pattern simulator cannot read."""


def parse(text: str) -> list[Clause]:
    """The clauses of an explanation written by ``render`` (``ExplanationSyntaxError`` otherwise)."""
    text = text.strip()
    if text == NOTHING:
        return []
    if not text.startswith(PREFIX):
        raise ExplanationSyntaxError(f"explanation {text[:60]!r} does not start with {PREFIX!r}")
    clauses, pos = [], len(PREFIX)
    while pos < len(text):
        for kind, pattern in _CLAUSES:
            found = pattern.match(text, pos)
            if found:
                break
        else:
            raise ExplanationSyntaxError(f"cannot read the clause at {text[pos:pos + 40]!r} in explanation {text[:80]!r}")
        *strings, strength = found.groups()
        strings = [ast.literal_eval(s) for s in strings]
        if kind == "token":
            clause = Clause("token", strings[0], None, None, int(strength))
        elif kind == "bigram":
            clause = Clause("bigram", strings[0], strings[1], None, int(strength))
        elif kind == "after":
            clause = Clause("after", None, strings[0], None, int(strength))
        else:
            clause = Clause("since", None, strings[0], strings[1] if len(strings) > 1 else None, int(strength))
        clauses.append(clause)
        pos = found.end()
        if text.startswith("; ", pos):
            pos += 2
        elif pos < len(text):
            raise ExplanationSyntaxError(f"expected '; ' at {text[pos:pos + 20]!r} in explanation {text[:80]!r}")
    return clauses


class Vocabulary:
    """Token strings and their ids. Ids that decode to the same text (e.g. partial UTF-8
    bytes, all shown as U+FFFD) share one *class*, so matching by text and by id agree."""

    def __init__(self, strings: list[str]):
        self.strings = list(strings)
        first_id: dict[str, int] = {}
        self.class_of = np.array([first_id.setdefault(s, i) for i, s in enumerate(self.strings)], dtype=np.int64)
        self.first_id = first_id

    @classmethod
    def of_tokenizer(cls, tokenizer) -> "Vocabulary":
        """Every id of a Hugging Face tokenizer, decoded one at a time (leading spaces kept)."""
        return cls([tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in range(len(tokenizer))])

    def classes(self, tokens_SL: np.ndarray) -> np.ndarray:
        """Token ids [S, L] as classes (``NO_TOKEN`` stays ``NO_TOKEN``)."""
        tokens_SL = np.asarray(tokens_SL, dtype=np.int64)
        return np.where(tokens_SL >= 0, self.class_of[np.clip(tokens_SL, 0, None)], NO_TOKEN)

    def class_id(self, text: str | None) -> int:
        """The class of a token string; ``NO_TOKEN`` - 1 (matches nothing) for an unknown one."""
        return self.first_id.get(text, NO_TOKEN - 1) if text is not None else NO_TOKEN - 1


# -- matching ------------------------------------------------------------------------------
def _previous(classes_SL: np.ndarray) -> np.ndarray:
    prev = np.full_like(classes_SL, NO_TOKEN)
    prev[:, 1:] = classes_SL[:, :-1]
    return prev


def _last_index(mask_SL: np.ndarray) -> np.ndarray:
    """Per position, the index of the last True at or before it (-1: none)."""
    idx = np.where(mask_SL, np.arange(mask_SL.shape[1]), -1)
    return np.maximum.accumulate(idx, axis=1)


def _since(classes_SL: np.ndarray, opening: int, closing: int | None) -> np.ndarray:
    last_open = _last_index(classes_SL == opening)
    strictly_before = np.full_like(last_open, -1)
    strictly_before[:, 1:] = last_open[:, :-1]  # the opening token itself is not inside
    if closing is None:
        return strictly_before >= 0
    return (strictly_before >= 0) & (strictly_before > _last_index(classes_SL == closing))


def matches(clause_kind: str, token: int, before: int, until: int | None, classes_SL: np.ndarray,
            prev_SL: np.ndarray) -> np.ndarray:
    """Where one clause (given as token classes) matches: bool [S, L]."""
    if clause_kind == "token":
        return classes_SL == token
    if clause_kind == "bigram":
        return (classes_SL == token) & (prev_SL == before)
    if clause_kind == "after":
        return prev_SL == before
    return _since(classes_SL, before, until)


class PatternSimulator:
    """Predicts activations from an explanation's text (module docstring)."""

    def __init__(self, vocabulary: Vocabulary):
        self.vocabulary = vocabulary

    def simulate(self, explanation: str, tokens_SL: np.ndarray) -> np.ndarray:
        """Predicted activation (0..10) of every token: [S, L] float."""
        classes_SL = self.vocabulary.classes(tokens_SL)
        prev_SL = _previous(classes_SL)
        out_SL = np.zeros(classes_SL.shape, dtype=np.float32)
        vocab = self.vocabulary
        for clause in parse(explanation):
            until = vocab.class_id(clause.until) if clause.until is not None else None
            hit = matches(clause.kind, vocab.class_id(clause.token), vocab.class_id(clause.before), until,
                          classes_SL, prev_SL)
            np.maximum(out_SL, np.where(hit, np.float32(clause.strength), np.float32(0)), out=out_SL)
        return out_SL


class PatternExplainer:
    """Learns clauses from an explain set (module docstring). ``kinds`` limits the clause
    kinds: ``("token",)`` gives the top-tokens-only reference explainer."""

    def __init__(self, vocabulary: Vocabulary, kinds: tuple[str, ...] = KINDS, max_clauses: int = 5,
                 min_gain: float = 0.01, candidates_per_kind: int = 24, min_support: int = 2):
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown clause kinds {sorted(unknown)}; choose from {KINDS}")
        self.vocabulary, self.kinds = vocabulary, tuple(kinds)
        self.max_clauses, self.min_gain = max_clauses, min_gain
        self.candidates_per_kind, self.min_support = candidates_per_kind, min_support

    @property
    def name(self) -> str:
        return "top tokens" if self.kinds == ("token",) else "patterns"

    def explain(self, tokens_SL: np.ndarray, activations_SL: np.ndarray) -> str:
        """An explanation of the activations ``activations_SL`` [S, L] on ``tokens_SL`` [S, L]."""
        classes_SL = self.vocabulary.classes(tokens_SL)
        prev_SL = _previous(classes_SL)
        acts_SL = np.clip(np.asarray(activations_SL, dtype=np.float64), 0, None)
        top = acts_SL.max() if acts_SL.size else 0.0
        if top <= 0:
            return NOTHING
        target = (acts_SL / top).reshape(-1)
        candidates = self._candidates(classes_SL, prev_SL, acts_SL > 0, acts_SL)
        if not candidates:
            return NOTHING
        hits_CN = np.stack([matches(k, t, b, u, classes_SL, prev_SL).reshape(-1) for k, t, b, u in candidates])
        support_C = hits_CN.sum(1)
        strength_C = np.clip(np.rint(10 * (hits_CN @ target) / np.maximum(support_C, 1)), 0, 10)
        keep = (strength_C >= 1) & ((hits_CN & (target > 0)).sum(1) >= min(self.min_support, int((target > 0).sum())))
        chosen, current_N, best = [], np.zeros_like(target), 0.0
        for _ in range(self.max_clauses):
            trial_CN = np.maximum(current_N, strength_C[:, None] * hits_CN)
            r_C = _pearson_rows(trial_CN, target)
            r_C[~keep] = -np.inf
            pick = int(np.argmax(r_C))
            if r_C[pick] - best < self.min_gain:
                break
            best, current_N = float(r_C[pick]), trial_CN[pick]
            chosen.append(pick)
            keep[pick] = False
        return render([self._clause(candidates[i], int(strength_C[i])) for i in chosen])

    def _clause(self, candidate, strength: int) -> Clause:
        kind, token, before, until = candidate
        text = self.vocabulary.strings
        return Clause(kind, text[token] if kind in ("token", "bigram") else None,
                      text[before] if kind != "token" else None,
                      text[until] if until is not None else None, strength)

    def _candidates(self, classes_SL, prev_SL, active_SL, acts_SL) -> list[tuple]:
        """Clauses worth trying: the tokens (and pairs, and earlier tokens) carrying the most
        activation mass, ``candidates_per_kind`` of each kind."""
        n = self.candidates_per_kind

        def heaviest(keys: np.ndarray, weights: np.ndarray) -> list:
            if keys.size == 0:
                return []
            unique, inverse = np.unique(keys, axis=0, return_inverse=True)
            mass = np.bincount(inverse.reshape(-1), weights=weights, minlength=len(unique))
            return [tuple(np.atleast_1d(unique[i]).tolist()) for i in np.argsort(-mass, kind="stable")[:n]]

        out = []
        mass = acts_SL[active_SL]
        current, previous = classes_SL[active_SL], prev_SL[active_SL]
        if "token" in self.kinds:
            out += [("token", t, NO_TOKEN, None) for (t,) in heaviest(current, mass)]
        if "bigram" in self.kinds:
            pairs = np.stack([current, previous], 1)[previous != NO_TOKEN]
            out += [("bigram", t, p, None) for t, p in heaviest(pairs, mass[previous != NO_TOKEN])]
        if "after" in self.kinds:
            out += [("after", NO_TOKEN, p, None) for (p,) in heaviest(previous[previous != NO_TOKEN], mass[previous != NO_TOKEN])]
        if "since" in self.kinds:
            out += self._since_candidates(classes_SL, active_SL, n)
        return out

    def _since_candidates(self, classes_SL, active_SL, n: int) -> list[tuple]:
        """Opening tokens seen before activating positions far more often than before silent
        ones; each with no closing token and with the token most often found where the
        activation stops after it."""
        S, L = classes_SL.shape
        seen_before_active, seen_before_silent = {}, {}
        for s in range(S):
            row = classes_SL[s]
            first_seen = {}
            for i, c in enumerate(row.tolist()):
                if c != NO_TOKEN and c not in first_seen:
                    first_seen[c] = i
            for c, i in first_seen.items():
                seen_before_active[c] = seen_before_active.get(c, 0) + int(active_SL[s, i + 1:].sum())
                seen_before_silent[c] = seen_before_silent.get(c, 0) + int((~active_SL[s, i + 1:]).sum())
        n_active, n_silent = max(1, int(active_SL.sum())), max(1, int((~active_SL).sum()))
        lift = {c: seen_before_active[c] / n_active - seen_before_silent[c] / n_silent for c in seen_before_active}
        openings = [c for c, v in sorted(lift.items(), key=lambda kv: (-kv[1], kv[0])) if v > 0][: max(1, n // 4)]
        out = []
        for opening in openings:
            out.append(("since", NO_TOKEN, opening, None))
            inside = _since(classes_SL, opening, None)
            stops = inside[:, 1:] & active_SL[:, :-1] & ~active_SL[:, 1:]  # activation ends here
            closers = classes_SL[:, 1:][stops]
            if closers.size:
                values, counts = np.unique(closers, return_counts=True)
                out.append(("since", NO_TOKEN, opening, int(values[np.argmax(counts)])))
        return out


def _pearson_rows(x_CN: np.ndarray, y_N: np.ndarray) -> np.ndarray:
    """Pearson r of every row of ``x_CN`` with ``y_N`` (0 for a constant row)."""
    xc = x_CN - x_CN.mean(1, keepdims=True)
    yc = y_N - y_N.mean()
    scale = np.sqrt((xc**2).sum(1) * (yc**2).sum())
    return np.where(scale > 0, xc @ yc / np.where(scale > 0, scale, 1), 0.0)
