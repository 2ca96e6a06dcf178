"""Run profiles: one switch that scales every notebook between CI and a real run.

``SAELIB_PROFILE`` picks the profile: ``smoke`` (seconds per notebook, for CI),
``default`` (the real results on a 2-core CPU) or ``full`` (paper-sized, for a GPU).
Notebooks choose their sizes with ``profile().pick(smoke=..., default=..., full=...)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

PROFILES = ("smoke", "default", "full")
T = TypeVar("T")


@dataclass(frozen=True)
class Profile:
    """The active run profile."""

    name: str
    """One of ``PROFILES``."""

    def pick(self, smoke: T, default: T, full: T | None = None) -> T:
        """The value for this profile; ``full`` falls back to ``default`` when not given."""
        if self.name == "smoke":
            return smoke
        if self.name == "full" and full is not None:
            return full
        return default

    @property
    def is_smoke(self) -> bool:
        return self.name == "smoke"


def profile(name: str | None = None) -> Profile:
    """The profile named by ``name``, else by ``$SAELIB_PROFILE``, else ``default``."""
    chosen = (name or os.environ.get("SAELIB_PROFILE") or "default").strip().lower()
    if chosen not in PROFILES:
        raise ValueError(f"unknown profile {chosen!r} (from SAELIB_PROFILE); choose one of {', '.join(PROFILES)}")
    return Profile(chosen)
