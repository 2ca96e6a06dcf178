"""The standard indirect-object-identification (IOI) templates, kept for evaluation only.

These are the fifteen templates of Wang et al. 2022 ("Interpretability in the Wild"),
written in ABBA order: ``{A}`` is the indirect object (the answer, the final slot) and
``{B}`` the subject, who is named twice. Swapping the first ``{A}`` and ``{B}`` gives the
BABA order. The embedded model's training stories must never contain them, so that the
IOI test runs on templates the model has not seen (``contains_eval_template`` checks).
"""

from __future__ import annotations

import re

IOI_EVAL_TEMPLATES: list[str] = [
    "Then, {A} and {B} went to the {PLACE}. {B} gave a {OBJECT} to {A}",
    "Then, {A} and {B} had a lot of fun at the {PLACE}. {B} gave a {OBJECT} to {A}",
    "Then, {A} and {B} were working at the {PLACE}. {B} decided to give a {OBJECT} to {A}",
    "Then, {A} and {B} were thinking about going to the {PLACE}. {B} wanted to give a {OBJECT} to {A}",
    "Then, {A} and {B} had a long argument, and afterwards {B} said to {A}",
    "After {A} and {B} went to the {PLACE}, {B} gave a {OBJECT} to {A}",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {B} decided to give it to {A}",
    "When {A} and {B} got a {OBJECT} at the {PLACE}, {B} decided to give the {OBJECT} to {A}",
    "While {A} and {B} were working at the {PLACE}, {B} gave a {OBJECT} to {A}",
    "While {A} and {B} were commuting to the {PLACE}, {B} gave a {OBJECT} to {A}",
    "After the lunch, {A} and {B} went to the {PLACE}. {B} gave a {OBJECT} to {A}",
    "Afterwards, {A} and {B} went to the {PLACE}. {B} gave a {OBJECT} to {A}",
    "Then, {A} and {B} had a long argument. Afterwards {B} said to {A}",
    "The {PLACE} {A} and {B} went to had a {OBJECT}. {B} gave it to {A}",
    "Friends {A} and {B} found a {OBJECT} at the {PLACE}. {B} gave it to {A}",
]

IOI_PLACES = ["store", "garden", "restaurant", "school", "hospital", "office", "house", "station"]
IOI_OBJECTS = ["ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack"]

_SLOT = re.compile(r"\{(A|B|PLACE|OBJECT)\}")
# Any capitalised word stands for a name and up to three words for a place or object,
# so the check is stricter than the templates themselves.
_SLOT_PATTERNS = {
    "A": r"[A-Z][\w'-]*",
    "B": r"[A-Z][\w'-]*",
    "PLACE": r"[\w'-]+(?: [\w'-]+){0,2}",
    "OBJECT": r"[\w'-]+(?: [\w'-]+){0,2}",
}


def template_prompt(template: str) -> str:
    """The template without its answer slot: the text the model reads before answering."""
    assert template.endswith(" {A}"), template
    return template[: -len(" {A}")]


def _prompt_regex(template: str) -> re.Pattern:
    parts = []
    position = 0
    prompt = template_prompt(template)
    for match in _SLOT.finditer(prompt):
        parts.append(re.escape(prompt[position : match.start()]))
        parts.append(_SLOT_PATTERNS[match.group(1)])
        position = match.end()
    parts.append(re.escape(prompt[position:]))
    # Whitespace may differ (line breaks in a story), wording may not.
    return re.compile("".join(parts).replace(r"\ ", r"\s+"))


EVAL_PROMPT_REGEXES = [_prompt_regex(t) for t in IOI_EVAL_TEMPLATES]


def contains_eval_template(text: str) -> bool:
    """True if ``text`` holds the prompt part of any IOI evaluation template, any fillers."""
    return any(regex.search(text) for regex in EVAL_PROMPT_REGEXES)


def normalise_frame(frame: str) -> str:
    """A frame with every name slot written ``<N>``, places ``<P>``, objects ``<O>``.

    Both the eval templates (``{A}``, ``{B}``) and story frames (``{X}``, ``{Y}``, ``{S}``,
    ``{IO}``, ...) map to the same markers, so their wording can be compared directly.
    """
    frame = re.sub(r"\{(A|B|X|Y|C|P|S|IO)\}", "<N>", frame)
    frame = re.sub(r"\{an_(ADJ_)?OBJECT2?\}", "a <O>", frame)
    frame = re.sub(r"\{OBJECT2?\}", "<O>", frame)
    return frame.replace("{PLACE}", "<P>")
