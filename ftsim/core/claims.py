"""Claims tables: what a theorem predicts, where it was checked, what was measured, and the verdict."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

__all__ = ["Claim", "format_claims", "claims_passed", "claims_markdown"]


@dataclasses.dataclass(frozen=True)
class Claim:
    """One checked statement.

    Attributes:
        claim: the statement in the paper's words (e.g. "head tuning recovers the task when W has full
            column rank").
        setting: where it was checked (sizes, seeds, preset).
        measured: the number(s) measured, as text with units or tolerances.
        passed: the verdict.
        source: the paper or oracle the claim comes from.
    """

    claim: str
    setting: str
    measured: str
    passed: bool
    source: str = ""

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"

    def row(self) -> dict[str, Any]:
        return {"claim": self.claim, "setting": self.setting, "measured": self.measured,
                "verdict": self.verdict, "source": self.source}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Claim":
        """The claim back from :meth:`row`."""
        if row.get("verdict") not in ("PASS", "FAIL"):
            raise ValueError(f"claim row has verdict {row.get('verdict')!r}, expected PASS or FAIL")
        return cls(row["claim"], row["setting"], row["measured"], row["verdict"] == "PASS", row.get("source", ""))


def claims_passed(claims: Iterable[Claim]) -> bool:
    return all(c.passed for c in claims)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def format_claims(claims: Sequence[Claim], widths: tuple[int, int, int, int] = (44, 30, 34, 7)) -> str:
    """A fixed-width text table (claim, setting, measured, verdict) for the terminal."""
    heads = ("claim", "setting", "measured", "verdict")
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [sep, "| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths)) + " |", sep]
    for c in claims:
        cols = [_wrap(c.claim, widths[0]), _wrap(c.setting, widths[1]), _wrap(c.measured, widths[2]),
                [c.verdict]]
        for i in range(max(map(len, cols))):
            cells = [(col[i] if i < len(col) else "").ljust(w) for col, w in zip(cols, widths)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(sep)
    n_pass = sum(c.passed for c in claims)
    lines.append(f"{n_pass}/{len(claims)} claims hold")
    return "\n".join(lines)


def claims_markdown(claims: Sequence[Claim]) -> str:
    out = ["| claim | setting | measured | verdict |", "|---|---|---|---|"]
    for c in claims:
        out.append(f"| {c.claim} | {c.setting} | {c.measured} | {c.verdict} |")
    return "\n".join(out) + "\n"
