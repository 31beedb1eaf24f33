"""The one base of every error a user can act on (in the lowest layer, so every layer raises it).

A ``UserError`` carries three parts: ``what`` happened, what was ``kept`` safe (or not changed), and
what to ``do`` next. The CLI catches this base — never a list of class names — prints the parts (exit
1; with --json, the parts too) and saves no traceback: it is not a bug. A subclass names the kind
of refusal (``ConfigError``, ``SubmitError``, …) and may declare the ``kept`` that holds wherever it is
raised (``IllegalTransition``: nothing was appended). Say only what was checked: a part that is not
known is left out.
"""

from __future__ import annotations


class UserError(Exception):
    """A request that cannot be served as asked; ``str()`` is the whole message on one line (the parts
    that are known, joined by "; ")."""

    kept: str = ""  # what holds wherever this kind is raised (a subclass may declare it)

    def __init__(self, what: str, *, kept: str | None = None, do: str = ""):
        self.what, self.do = what, do
        if kept is not None:
            self.kept = kept
        super().__init__(what)

    def parts(self) -> dict[str, str]:
        """{"what", "kept", "do"}: the message in its three parts ("" where one is not known)."""
        return {"what": self.what, "kept": self.kept, "do": self.do}

    def __str__(self) -> str:
        return "; ".join(p for p in (self.what, self.kept, self.do) if p)
