"""What the root model is told. The context itself never appears here: only its shape."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ContextShape:
    """Metadata the root model is told about the context."""

    kind: str  # "text" | "documents"
    characters: int
    documents: int = 0
    document_lengths: tuple[int, ...] = ()
    name: str | None = None


def system_prompt(shape: ContextShape, sub_capacity: int = 400_000) -> str:
    kind_hint = ("a list of strings, one per document; the source paths are in `context_paths`"
                 if shape.kind == "documents" else "one string")
    return SYSTEM_PROMPT.format(kind_hint=kind_hint, sub_capacity=f"{sub_capacity:,}")


def first_user_message(query: str, shape: ContextShape) -> str:
    if shape.kind == "documents":
        lengths = ", ".join(f"{n:,}" for n in shape.document_lengths[:20])
        more = ", ..." if shape.documents > len(shape.document_lengths[:20]) else ""
        about = (f"`context` is a list of {shape.documents:,} documents ({shape.characters:,} "
                 f"characters in total); document lengths: [{lengths}{more}].")
    else:
        about = f"`context` is a string of {shape.characters:,} characters."
    name = f" It was loaded from {shape.name}." if shape.name else ""
    return (f"{about}{name}\n\nQuery: {query}\n\n"
            "You have not looked at the context yet. Start by exploring it in the REPL.")


def cell_outputs_message(rendered_cells: list[tuple[str, str]], iteration: int, max_iterations: int) -> str:
    """The user message carrying the executed blocks' outputs back to the root model."""
    parts = []
    for index, (code, output) in enumerate(rendered_cells, 1):
        excerpt = code if len(code) <= 400 else code[:400] + " ..."
        parts.append(f"Block {index}:\n```\n{excerpt}\n```\nOutput:\n{output}")
    left = max_iterations - iteration
    parts.append(f"[iteration {iteration}/{max_iterations}; {left} left]")
    return "\n\n".join(parts)
