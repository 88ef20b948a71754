"""Reading the root model's replies: which code runs, which FINAL lines are answers, the prose."""

from __future__ import annotations

import pytest

from rlm_mcp.engine.replies import FinalDirective, code_blocks, final_directive, prose, strip_final_wrapper


def test_repl_python_and_py_blocks_are_code_in_order():
    reply = "first\n```repl\nx = 1\n```\nthen\n```python\ny = 2\n```\n```PY  \nz = 3\n```"
    assert code_blocks(reply) == ["x = 1", "y = 2", "z = 3"]


def test_other_fences_and_empty_blocks_are_not_code():
    reply = "```json\n{\"a\": 1}\n```\n```\nplain\n```\n```repl\n\n```\n```bash\nrm -rf /\n```"
    assert code_blocks(reply) == []


def test_a_block_keeps_its_inner_blank_lines_and_indentation():
    assert code_blocks("```repl\nfor i in x:\n\n    print(i)\n```") == ["for i in x:\n\n    print(i)"]


def test_an_unclosed_block_is_not_run():
    assert code_blocks("```repl\nprint('never closed')") == []


@pytest.mark.parametrize("reply, directive", [
    ("Done.\nFINAL(the answer is 7)", FinalDirective(text="the answer is 7")),
    ("  FINAL('quoted')  ", FinalDirective(text="quoted")),
    ('FINAL("""triple""")', FinalDirective(text="triple")),
    ("FINAL(f(x) = (a + b))", FinalDirective(text="f(x) = (a + b)")),
    ("I stored it.\nFINAL_VAR(result)", FinalDirective(variable="result")),
    ("FINAL_VAR('result')", FinalDirective(variable="result")),
    ("FINAL_VAR( \"my_var2\" )", FinalDirective(variable="my_var2")),
])
def test_final_lines_outside_code_are_directives(reply, directive):
    assert final_directive(reply) == directive


@pytest.mark.parametrize("reply", [
    "```repl\nprint('FINAL(not yet)')\n```",
    "```repl\nFINAL_VAR(result)\n```",
    "We will call FINAL(x) later, not on its own line",
    "FINAL_VAR(1bad)",
    "FINAL_VAR(a.b)",
    "no directive at all",
])
def test_final_inside_code_or_mid_sentence_or_malformed_is_not_a_directive(reply):
    assert final_directive(reply) is None


def test_final_var_wins_over_final_when_both_are_written():
    assert final_directive("FINAL(text)\nFINAL_VAR(name)") == FinalDirective(variable="name")


def test_final_after_an_unclosed_fence_is_inside_code():
    assert final_directive("```repl\nx = 1\nFINAL(inside)") is None


def test_prose_is_the_reply_without_its_fenced_blocks():
    reply = "Let me look.\n```repl\nprint(1)\n```\nThe answer follows.\n```json\n{}\n```"
    assert prose(reply) == "Let me look.\n\nThe answer follows."
    assert prose("```repl\nonly code\n```") == ""


@pytest.mark.parametrize("text, answer", [
    ("FINAL(42)", "42"),
    ("  just an answer  ", "just an answer"),
    ("Here it is:\nFINAL('yes')", "yes"),
    ("FINAL_VAR(x)", "FINAL_VAR(x)"),  # a variable cannot be read in the last-chance answer
])
def test_the_last_chance_answer_loses_its_final_wrapper(text, answer):
    assert strip_final_wrapper(text) == answer
