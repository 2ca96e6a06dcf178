"""Feature dashboards that render with no network: plain HTML/CSS token views and plotly.

A dashboard shows one feature the way published SAE visualisers do: top activating
examples in context, examples from quantile bands of the activation range, the activation
histogram and density, the tokens the decoder direction promotes and suppresses through
the unembedding, and the nearest features by decoder cosine::

    acts = FeatureActivations.collect(sae, store)
    dashboard = feature_dashboard(acts, sae, model, feature=123)
    dashboard.show()                 # in a notebook
    dashboard.save("feature_123.html")   # a standalone page, plotly.js inlined once

Token colouring is plain HTML with inline styles (no JavaScript), so it renders in any
notebook front end, an exported report, or a browser opened from disk. ``cv_tokens`` gives
the circuitsvis view instead, through its inline bundle (about 1 MB per view: use sparingly).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np

from .features import Example, FeatureActivations, decode_token, decoder_neighbours, logit_effects

_TOKEN_STYLE = ("font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;line-height:1.9;"
                "white-space:pre-wrap;word-break:break-word")
_PEAK_STYLE = "outline:1.5px solid #b34700;"


def _shown(text: str) -> str:
    """Token text made visible: newlines as ↵, tabs as →, then HTML-escaped."""
    return html.escape(text.replace("\n", "↵").replace("\t", "→"))


def token_html(tokens: list[str], values, max_value: float | None = None, peak: int | None = None,
               css_class: str = "saelib-tokens") -> str:
    """Tokens as inline spans shaded by ``values`` (orange, opacity ∝ value / ``max_value``),
    each with its value as a tooltip; ``peak`` outlines one position. No JavaScript."""
    values = np.asarray(values, dtype=float)
    top = float(max_value if max_value is not None else (values.max() if len(values) else 0.0)) or 1.0
    spans = []
    for position, (text, value) in enumerate(zip(tokens, values)):
        alpha = min(1.0, max(0.0, value / top))
        style = f"background:rgba(255,127,14,{alpha:.2f});border-radius:2px;padding:0 1px;"
        if position == peak:
            style += _PEAK_STYLE
        spans.append(f'<span style="{style}" title="{html.escape(repr(text))}: {value:.3g}">{_shown(text)}</span>')
    return f'<div class="{css_class}" style="{_TOKEN_STYLE}">{"".join(spans)}</div>'


def cv_tokens(tokens: list[str], values):
    """circuitsvis ``colored_tokens`` view (inline bundle after ``saelib.nb.setup``)."""
    from circuitsvis.tokens import colored_tokens

    return colored_tokens(tokens=list(tokens), values=[float(v) for v in values])


def _window(n_tokens: int, position: int, before: int, after: int) -> tuple[slice, int]:
    """The slice of a context shown around ``position``, and the position within it."""
    lo = max(1, position - before)  # never show BOS
    return slice(lo, min(n_tokens, position + after + 1)), position - lo


@dataclass
class FeatureDashboard:
    """Everything shown for one feature; ``show()`` in a notebook, ``html()`` or ``save()`` elsewhere."""

    feature: int
    label: str
    density: float
    max_activation: float
    n_rows: int
    top: list[tuple[Example, list[str], np.ndarray, int]]
    """Top examples: (example, token strings of its window, activations, peak index)."""
    bands: list[dict]
    """Quantile bands, each with ``examples`` as in ``top``."""
    top_tokens: list[tuple[str, int]]
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    neighbours: list[tuple[int, float]]
    values: np.ndarray = field(repr=False)
    """All nonzero activations (for the histogram)."""
    logit_effects_V: np.ndarray = field(repr=False)
    explanation: str = ""
    """An autointerp explanation with its score (``saelib.autointerp``), shown under the title."""

    # -- pieces ------------------------------------------------------------------------------
    def header_html(self) -> str:
        tokens = ", ".join(f"<code>{_shown(t)}</code> ×{c}" for t, c in self.top_tokens[:6]) or "—"
        neighbours = ", ".join(f"#{f} ({c:.2f})" for f, c in self.neighbours) or "—"
        explained = (f"<p class='saelib-explanation' style='margin:2px 0'><b>explanation:</b> {html.escape(self.explanation)}</p>"
                     if self.explanation else "")
        return (f'<div class="saelib-dashboard-header"><h3 style="margin:4px 0">{html.escape(self.label)} · feature '
                f"#{self.feature}</h3>{explained}<p style='margin:2px 0'>fires on {self.density:.3%} of {self.n_rows:,} tokens "
                f"(log10 density {np.log10(max(self.density, 1e-12)):.2f}) · max activation {self.max_activation:.3g}</p>"
                f"<p style='margin:2px 0'>most frequent tokens: {tokens}</p>"
                f"<p style='margin:2px 0'>nearest features by decoder cosine: {neighbours}</p></div>")

    def logits_html(self) -> str:
        def column(title, items, colour):
            cells = "".join(f"<tr><td><code>{_shown(t)}</code></td><td style='text-align:right;color:{colour}'>{v:+.3f}</td></tr>"
                            for t, v in items)
            return f"<table style='display:inline-table;margin-right:24px'><caption>{title}</caption>{cells}</table>"

        return ('<div class="saelib-logits">' + column("promoted tokens", self.promoted, "#1a7f37")
                + column("suppressed tokens", self.suppressed, "#cf222e") + "</div>")

    def examples_html(self) -> str:
        def rows(examples):
            return "".join(f"<tr><td style='text-align:right;padding-right:8px;vertical-align:top'>{example.value:.2f}</td>"
                           f"<td>{token_html(tokens, acts, self.max_activation, peak)}</td></tr>"
                           for example, tokens, acts, peak in examples)

        parts = [f"<h4 style='margin:8px 0 2px'>Top activations</h4><table>{rows(self.top)}</table>"]
        for band in self.bands:
            parts.append(f"<h4 style='margin:8px 0 2px'>Interval {band['low']:.2f}–{band['high']:.2f}, "
                         f"contains {band['share']:.1%}</h4><table>{rows(band['examples'])}</table>")
        return '<div class="saelib-examples">' + "".join(parts) + "</div>"

    def figures(self):
        """(activation histogram, logit-effect histogram) as plotly figures."""
        import plotly.graph_objects as go

        histogram = go.Figure(go.Histogram(x=self.values, nbinsx=50, marker_color="#ff7f0e"))
        for band in self.bands[1:]:
            histogram.add_vline(x=band["high"], line_dash="dot", line_color="grey")
        histogram.update_layout(title=f"Feature #{self.feature}: activations when firing (density {self.density:.3%})",
                                xaxis_title="activation", yaxis_title="tokens", height=280, margin=dict(t=40, b=40))
        effects = go.Figure(go.Histogram(x=self.logit_effects_V, nbinsx=60, marker_color="#1f77b4"))
        effects.update_layout(title=f"Feature #{self.feature}: direct effect on every token's logit (W_dec · W_U)",
                              xaxis_title="logit effect", yaxis_title="tokens", height=280, margin=dict(t=40, b=40))
        return histogram, effects

    # -- whole dashboard -----------------------------------------------------------------------
    def html(self, include_plotlyjs: bool | str = False) -> str:
        """The dashboard as one HTML fragment; plotly.js must already be on the page unless
        ``include_plotlyjs`` (True: inline it)."""
        histogram, effects = self.figures()
        plots = "".join(f.to_html(full_html=False, include_plotlyjs=include_plotlyjs if i == 0 else False)
                        for i, f in enumerate((histogram, effects)))
        return (f'<div class="saelib-dashboard" data-feature="{self.feature}">' + self.header_html()
                + self.logits_html() + plots + self.examples_html() + "</div>")

    def save(self, path) -> None:
        """A standalone page that opens offline (plotly.js inlined)."""
        from pathlib import Path

        page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.label)} #{self.feature}</title></head><body>"
        Path(path).write_text(page + self.html(include_plotlyjs=True) + "</body></html>", encoding="utf-8")

    def show(self, renderer: str | None = None) -> None:
        """Display in a notebook: HTML parts and the plotly figures through ``renderer``
        (default: the active one)."""
        from IPython.display import HTML, display

        display(HTML(self.header_html() + self.logits_html()))
        for figure in self.figures():
            figure.show(renderer=renderer)
        display(HTML(self.examples_html()))


def feature_dashboard(acts: FeatureActivations, sae, model, feature: int, label: str = "SAE", n_top: int = 8,
                      n_bands: int = 4, per_band: int = 3, window: tuple[int, int] = (16, 4), n_logits: int = 8,
                      seed: int = 0, explanation: str = "") -> FeatureDashboard:
    """Build the dashboard of ``feature`` from ``acts`` (token windows ``window`` = tokens
    before and after each example's peak); ``explanation`` (e.g. an autointerp explanation
    and its score) is shown in the header."""
    tokenizer = model.tokenizer

    def in_context(examples: list[Example]):
        shown = []
        for example in examples:
            tokens_L, acts_L = acts.context_activations(feature, example)
            span, peak = _window(len(tokens_L), example.position, *window)
            shown.append((example, [decode_token(tokenizer, t) for t in tokens_L[span]], acts_L[span], peak))
        return shown

    bands = acts.quantile_bands(feature, n_bands=n_bands, per_band=per_band, seed=seed)
    effects_V, promoted, suppressed = logit_effects(sae, model, feature, n_logits)
    _, values = acts.of(feature)
    return FeatureDashboard(
        feature=int(feature), label=label, density=float(acts.density()[feature]),
        max_activation=float(acts.max_activation()[feature]), n_rows=acts.n_rows,
        top=in_context(acts.top_examples(feature, n_top)),
        bands=[{**band, "examples": in_context(band["examples"])} for band in bands[1:]],  # the top band is the top examples' range
        top_tokens=[(decode_token(tokenizer, t), c) for t, c in acts.token_counts(feature, 10)],
        promoted=[(decode_token(tokenizer, t), float(effects_V[t])) for t in promoted],
        suppressed=[(decode_token(tokenizer, t), float(effects_V[t])) for t in suppressed],
        neighbours=decoder_neighbours(sae, feature), values=values.copy(), logit_effects_V=effects_V.numpy(),
        explanation=explanation,
    )
