"""An ipywidgets explorer over one or more SAEs: pick a feature, search features by token,
type your own text and see which features fire where.

    explorer = FeatureExplorer(model, {"topk_4096": (sae, acts)})
    explorer.display(static_features=[12, 345])

Everything it draws is plain HTML (``saelib.viz``) and plotly, so it works in JupyterLab
with no network. Where no front end will ever answer (``SAELIB_HEADLESS=1``: the main job
writing HTML reports, and the test command), ``display`` shows static dashboards of
``static_features`` instead of a widget that would render empty.
"""

from __future__ import annotations

import html

import numpy as np
import torch

from .features import FeatureActivations, decode_token
from .viz import feature_dashboard, token_html


def headless() -> bool:
    """True when the notebook runs with no front end to talk to widgets (the main job)."""
    from .nb import env_flag

    return env_flag("SAELIB_HEADLESS")


class FeatureExplorer:
    """Widgets over ``saes``: {name: (sae, FeatureActivations)} at hooks of ``model``;
    ``explanations`` ({name: {feature: text}}, e.g. from ``saelib.autointerp``) appear in the
    feature table and dashboards, and the search finds features by them."""

    def __init__(self, model, saes: dict[str, tuple[object, FeatureActivations]], max_search_results: int = 20,
                 explanations: dict[str, dict[int, str]] | None = None):
        if not saes:
            raise ValueError("give at least one SAE: {name: (sae, FeatureActivations)}")
        self.model = model
        self.saes = saes
        self.max_search_results = max_search_results
        self.explanations = explanations or {}
        self._tables: dict[str, object] = {}
        self._widget = None

    # -- logic (plain methods, testable without a front end) -----------------------------------
    def table(self, name: str):
        """The feature table of SAE ``name`` (cached)."""
        if name not in self._tables:
            table = self.saes[name][1].feature_table(self.model.tokenizer)
            explained = self.explanations.get(name, {})
            table["explanation"] = [explained.get(int(f), "") for f in table.feature]
            self._tables[name] = table
        return self._tables[name]

    def search(self, name: str, query: str) -> list[int]:
        """Features of SAE ``name`` whose most frequent tokens or explanation contain ``query``
        (case-insensitive, surrounding spaces ignored), most single-minded first."""
        query = query.strip().lower()
        if not query:
            return []
        table = self.table(name)
        in_tokens = table.top_tokens.map(lambda tokens: any(query in t.strip().lower() for t in tokens))
        hits = table[in_tokens | table.explanation.str.lower().str.contains(query, regex=False)]
        return hits.sort_values("top_token_share", ascending=False).feature.head(self.max_search_results).tolist()

    @torch.no_grad()
    def text_latents(self, name: str, text: str) -> tuple[list[str], np.ndarray]:
        """(token strings, latents [pos, d_sae]) of ``text`` under SAE ``name`` (BOS dropped)."""
        sae = self.saes[name][0]
        tokens_1L = self.model.to_tokens(text)
        _, cache = self.model.run_with_cache(tokens_1L, names_filter=sae.cfg.hook_name)
        latents_LF = sae.encode(cache[sae.cfg.hook_name][0].reshape(tokens_1L.shape[1], -1).to(sae.W_enc.dtype))
        strings = [decode_token(self.model.tokenizer, t) for t in tokens_1L[0].tolist()]
        return strings[1:], latents_LF[1:].cpu().numpy()

    def text_html(self, name: str, text: str, feature: int, n_per_token: int = 3) -> str:
        """``text`` shaded by ``feature``, then a table of the strongest features at each token."""
        strings, latents_LF = self.text_latents(name, text)
        view = token_html(strings, latents_LF[:, feature], max_value=max(1e-6, float(latents_LF[:, feature].max())))
        rows = []
        for position, token in enumerate(strings):
            order = np.argsort(-latents_LF[position])[:n_per_token]
            fired = ", ".join(f"#{f} ({latents_LF[position, f]:.2f})" for f in order if latents_LF[position, f] > 0)
            rows.append(f"<tr><td><code>{html.escape(repr(token))}</code></td><td>{fired or '—'}</td></tr>")
        return (f"<p>Feature #{feature} on your text:</p>{view}<table class='saelib-text-features'>"
                f"<tr><th>token</th><th>strongest features</th></tr>{''.join(rows)}</table>")

    def dashboard(self, name: str, feature: int):
        sae, acts = self.saes[name]
        return feature_dashboard(acts, sae, self.model, feature, label=name,
                                 explanation=self.explanations.get(name, {}).get(feature, ""))

    # -- widgets -------------------------------------------------------------------------------
    @property
    def widget(self):
        """The explorer as one ipywidgets box (built on first use)."""
        if self._widget is None:
            self._widget = self._build()
        return self._widget

    def _build(self):
        import ipywidgets as w

        names = list(self.saes)
        self.sae_choice = w.Dropdown(options=names, value=names[0], description="SAE")
        self.feature_choice = w.BoundedIntText(value=0, min=0, max=self.saes[names[0]][0].cfg.d_sae - 1, description="feature")
        self.query = w.Text(placeholder="token text, e.g. def", description="search")
        self.results = w.Select(options=[], rows=6, description="matches")
        self.text = w.Textarea(value="The whale swam past the ship.", description="your text", layout=w.Layout(width="95%"))
        run_text = w.Button(description="show features")
        self.dashboard_out, self.text_out = w.Output(), w.Output()

        def redraw(*_):
            self.shown = (self.sae_choice.value, self.feature_choice.value)
            self.dashboard_out.clear_output(wait=True)
            with self.dashboard_out:
                # The mimetype renderer: JupyterLab draws it offline, and the "notebook"
                # renderer's one-off plotly.js injection stalls inside an Output widget.
                self.dashboard(self.sae_choice.value, self.feature_choice.value).show(renderer="plotly_mimetype")

        def change_sae(change):
            self.feature_choice.max = self.saes[change["new"]][0].cfg.d_sae - 1
            redraw()

        def do_search(change):
            self.results.options = [(f"#{f}", f) for f in self.search(self.sae_choice.value, change["new"])]

        def pick_result(change):
            if change["new"] is not None:
                self.feature_choice.value = change["new"]

        def show_text(*_):
            self.text_out.clear_output(wait=True)
            with self.text_out:
                from IPython.display import HTML, display

                display(HTML(self.text_html(self.sae_choice.value, self.text.value, self.feature_choice.value)))

        self.sae_choice.observe(change_sae, names="value")
        self.feature_choice.observe(redraw, names="value")
        self.query.observe(do_search, names="value")
        self.results.observe(pick_result, names="value")
        run_text.on_click(show_text)
        tabs = w.Tab(children=[self.dashboard_out, w.VBox([self.text, run_text, self.text_out])])
        tabs.set_title(0, "dashboard")
        tabs.set_title(1, "your text")
        redraw()
        return w.VBox([w.HBox([self.sae_choice, self.feature_choice]), w.HBox([self.query, self.results]), tabs])

    def display(self, static_features: list[int] | None = None, static_sae: str | None = None) -> None:
        """Show the widget; in a headless run, static dashboards of ``static_features`` instead."""
        from IPython.display import HTML, display

        if headless():
            name = static_sae or next(iter(self.saes))
            display(HTML(f"<p><b>Feature explorer</b> (interactive in JupyterLab; this report has no kernel, "
                         f"so here are static dashboards of {len(static_features or [])} features of {html.escape(name)})</p>"))
            for feature in static_features or []:
                self.dashboard(name, feature).show()
            return
        display(self.widget)
