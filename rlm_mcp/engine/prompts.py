"""What the root model is told. The context itself never appears here: only its shape."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlm_mcp.errors import ConfigError

SYSTEM_PROMPT = """\
You are answering a query about a context that is far too large to read directly. The context is \
loaded in a persistent Python REPL as the variable `context`; you never see it unless you print \
parts of it. Work by writing Python code in ```repl fenced blocks; every block in your reply is \
executed in order and you will see what it printed (long output is truncated, so print slices, \
counts and summaries, not whole documents).

In the REPL you have:
- `context`: the input ({kind_hint}).
- `llm_query(prompt, model=None) -> str`: ask a language model one question. It can read about \
{sub_capacity} characters at once, so give it chunks of the context with precise instructions.
- `llm_query_batched(prompts, model=None) -> list[str]`: many questions concurrently, replies in \
the same order; a failed prompt returns a string starting with "Error:". Prefer it to loops of \
llm_query.
- `rlm_query(prompt, model=None) -> str` and `rlm_query_batched(prompts, model=None)`: hand a \
sub-task to a child RLM that gets `prompt` as its own `context` and REPL (use for sub-tasks that \
are themselves too large or need several steps).
- `SHOW_VARS()`: list the variables you have created.
- Standard Python: `re`, `json`, `collections` and the rest of the standard library.

Strategy: first look at the shape of `context` (type, length, a few samples), then filter with \
code (regex, slicing, splitting) and use sub-model calls on the relevant parts; keep intermediate \
results in variables. Verify before answering.

When you know the answer, submit it in one of these ways:
- in code: `answer["content"] = <your answer>` then `answer["ready"] = True`, or `FINAL(text)`, \
or `FINAL_VAR("variable_name")`;
- or as a line of your reply outside any code block: FINAL(your answer) or FINAL_VAR(variable_name).
Only submit once you have checked the answer against the data."""

NUDGE = ("Your reply had no ```repl code block and no final answer. Continue by writing code in a "
         "```repl block, or submit your answer with FINAL(...) or answer[\"content\"]/answer[\"ready\"].")

ANSWER_NOW = ("You have used all your iterations. Answer the query now with the information you "
              "have gathered, as plain text (no code). Query: {query}")

LIMIT_ANSWER_NOW = ("The run has to stop: {reason}. Answer the query now with the information you have "
                    "gathered, as plain text (no code); say what is uncertain. Query: {query}")

RESUME = ("The run was stopped by its {limit} limit, which has now been raised: you can go on working "
          "(iteration {iteration} of {max_iterations}). The REPL {repl}. Continue with the query: {query}")

COMPACTION_SYSTEM = ("You summarise the working notes of an agent that answers a query by running Python "
                     "code in a REPL. Write a compact summary that lets it continue without the full "
                     "history: what it found so far (with exact values), which REPL variables hold what, "
                     "what failed, and what remains to do. Plain text, at most 400 words.")

# Placeholders a custom system prompt may use; the engine fills them for each RLM of a run.
PLACEHOLDERS = {
    "context_type": "'text' (one string) or 'documents' (a list of strings)",
    "context_total_chars": "characters in the whole context",
    "context_document_count": "documents in the context (0 for text)",
    "context_document_lengths": "the first 20 document lengths, e.g. '[1,200, 5,003, ...]' ('[]' for text)",
    "context_name": "where the context was loaded from ('' when unnamed)",
    "sub_model_capacity_chars": "characters one llm_query call can take",
}


@dataclass(frozen=True)
class ContextShape:
    """Metadata the root model is told about the context."""

    kind: str  # "text" | "documents"
    characters: int
    documents: int = 0
    document_lengths: tuple[int, ...] = ()
    name: str | None = None


def system_prompt(shape: ContextShape, sub_capacity: int = 400_000, template: str | None = None) -> str:
    """The built-in system prompt, or ``template`` (checked with :func:`check_template`) filled in."""
    if template is not None:
        return template.format(**placeholder_values(shape, sub_capacity))
    kind_hint = ("a list of strings, one per document; the source paths are in `context_paths`"
                 if shape.kind == "documents" else "one string")
    return SYSTEM_PROMPT.format(kind_hint=kind_hint, sub_capacity=f"{sub_capacity:,}")


def placeholder_values(shape: ContextShape, sub_capacity: int) -> dict[str, Any]:
    lengths = ", ".join(f"{n:,}" for n in shape.document_lengths[:20])
    more = ", ..." if shape.documents > len(shape.document_lengths[:20]) else ""
    return {"context_type": shape.kind, "context_total_chars": shape.characters,
            "context_document_count": shape.documents, "context_document_lengths": f"[{lengths}{more}]",
            "context_name": shape.name or "", "sub_model_capacity_chars": sub_capacity}


def check_template(template: str, source: str) -> str:
    """``template`` if every ``{placeholder}`` in it is known and it formats, else ConfigError.
    Only bare names are accepted: ``{x.attr}`` or ``{x[0]}`` would reach into Python objects."""
    known = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
    if not template.strip():
        raise ConfigError(f"{source}: the system prompt is empty")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"{source}: the system prompt is not a valid template ({exc}); write literal braces "
                          f"as {{{{ and }}}}; placeholders: {known}") from None
    unknown = sorted({name for name in fields if name not in PLACEHOLDERS})
    if unknown:
        shown = ", ".join("{" + name + "}" for name in unknown[:5])
        raise ConfigError(f"{source}: unknown placeholder(s) {shown} in the system prompt; use {known}, and write "
                          "literal braces as {{ and }}")
    try:
        template.format(**placeholder_values(ContextShape("text", 0), 1))
    except (ValueError, TypeError) as exc:  # a bad format spec, e.g. {context_type:d}
        raise ConfigError(f"{source}: the system prompt does not format: {exc}") from None
    return template


def history_account(turns: Sequence[dict[str, Any]], repl_kept: bool) -> str:
    """The compact account of earlier turns a follow-up's root model starts with."""
    lines = ["Earlier questions in this session (most recent last):"]
    for index, turn in enumerate(turns, 1):
        lines.append(f"{index}. Query: {turn.get('query') or '(continued the previous query)'}")
        lines.append(f"   Outcome: {turn.get('status')} after {turn.get('iterations', 0)} iterations"
                     + (f"; variables then in the REPL: {', '.join(turn['variables'][:30])}"
                        if turn.get("variables") else ""))
        if turn.get("notes"):
            lines.append(f"   Last working notes: {turn['notes']}")
        lines.append(f"   Answer: {turn.get('answer') if turn.get('answer') is not None else '(none)'}")
    lines.append("The REPL still holds every variable these runs created; reuse them instead of recomputing."
                 if repl_kept else
                 "The REPL of those runs is gone: this is a fresh REPL, their variables do not exist any more.")
    return "\n".join(lines)


def first_user_message(query: str, shape: ContextShape, history: str | None = None) -> str:
    if shape.kind == "documents":
        lengths = ", ".join(f"{n:,}" for n in shape.document_lengths[:20])
        more = ", ..." if shape.documents > len(shape.document_lengths[:20]) else ""
        about = (f"`context` is a list of {shape.documents:,} documents ({shape.characters:,} "
                 f"characters in total); document lengths: [{lengths}{more}].")
    else:
        about = f"`context` is a string of {shape.characters:,} characters."
    name = f" It was loaded from {shape.name}." if shape.name else ""
    if history:
        return (f"{about}{name}\n\n{history}\n\nNew query: {query}\n\n"
                "Build on what earlier runs found; check the REPL with SHOW_VARS() if unsure.")
    return (f"{about}{name}\n\nQuery: {query}\n\n"
            "You have not looked at the context yet. Start by exploring it in the REPL.")


def compaction_request(older: Sequence[dict[str, str]], budget_chars: int) -> list[dict[str, str]]:
    """The one call that summarises ``older`` messages, each cut so the whole fits ``budget_chars``."""
    each = max(500, budget_chars // max(1, len(older)))
    transcript = []
    for message in older:
        text = message.get("content") or ""
        if len(text) > each:
            text = text[:each // 2] + f"\n[... {len(text) - each:,} characters cut ...]\n" + text[-each // 2:]
        transcript.append(f"--- {message.get('role')} ---\n{text}")
    return [{"role": "system", "content": COMPACTION_SYSTEM},
            {"role": "user", "content": "The agent's history so far:\n\n" + "\n\n".join(transcript)
             + "\n\nWrite the summary now."}]


def compacted_first_message(first: str, summary: str, dropped: int) -> str:
    return (f"{first}\n\n[{dropped} earlier messages of this run were compacted to stay within the model's "
            f"context window. Summary of the work so far:]\n{summary}")


def cell_outputs_message(rendered_cells: list[tuple[str, str]], iteration: int, max_iterations: int) -> str:
    """The user message carrying the executed blocks' outputs back to the root model."""
    parts = []
    for index, (code, output) in enumerate(rendered_cells, 1):
        excerpt = code if len(code) <= 400 else code[:400] + " ..."
        parts.append(f"Block {index}:\n```\n{excerpt}\n```\nOutput:\n{output}")
    left = max_iterations - iteration
    parts.append(f"[iteration {iteration}/{max_iterations}; {left} left]")
    return "\n\n".join(parts)
