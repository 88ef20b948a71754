"""Reading the root model's replies: code blocks to run and final answers outside code."""

from __future__ import annotations

import re
from dataclasses import dataclass

CODE_BLOCK = re.compile(r"```(?:repl|python|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
ANY_FENCE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
FINAL_LINE = re.compile(r"^[ \t]*FINAL\((.*)\)[ \t]*$", re.DOTALL | re.MULTILINE)
FINAL_VAR_LINE = re.compile(r"^[ \t]*FINAL_VAR\(\s*['\"]?([A-Za-z_][A-Za-z0-9_]*)['\"]?\s*\)[ \t]*$",
                            re.MULTILINE)


@dataclass(frozen=True)
class FinalDirective:
    """``FINAL(text)`` (``text`` set) or ``FINAL_VAR(name)`` (``variable`` set) outside code."""

    text: str | None = None
    variable: str | None = None


def code_blocks(reply: str) -> list[str]:
    """The ```repl / ```python blocks of a reply, in order."""
    return [block.strip("\n") for block in CODE_BLOCK.findall(reply) if block.strip()]


def prose(reply: str) -> str:
    """The reply with every fenced block removed."""
    return ANY_FENCE.sub("", reply).strip()


def substantive(reply: str, min_words: int = 4) -> str | None:
    """The part of a reply worth reporting as a partial answer: its longest stretch of prose
    outside code blocks, if that says something (a connective between two blocks, like "and",
    is not an answer)."""
    pieces = [piece.strip() for piece in ANY_FENCE.split(reply)]
    pieces = [piece for piece in pieces if len(piece.split()) >= min_words]
    return max(pieces, key=len) if pieces else None


def final_directive(reply: str) -> FinalDirective | None:
    """A FINAL / FINAL_VAR line written outside any code block, if there is one."""
    text = ANY_FENCE.sub("", reply)
    variable = FINAL_VAR_LINE.search(text)
    if variable:
        return FinalDirective(variable=variable.group(1))
    match = FINAL_LINE.search(text)
    if match:
        return FinalDirective(text=_unquote(match.group(1).strip()))
    return None


def strip_final_wrapper(text: str) -> str:
    """'FINAL(x)' -> 'x' for the last-chance answer; other text unchanged."""
    directive = final_directive(text)
    return directive.text if directive and directive.text is not None else text.strip()


def _unquote(text: str) -> str:
    for quote in ('"""', "'''", '"', "'"):
        if len(text) >= 2 * len(quote) and text.startswith(quote) and text.endswith(quote):
            return text[len(quote):-len(quote)]
    return text
