"""`rlm-mcp run --continue-from` and `--system-prompt-file`, as a user runs them (a subprocess
against the scripted model server)."""

from __future__ import annotations

import json

from tests.engine.test_engine import repl
from tests.server.test_transports import assert_one_error_line, rlm_mcp


def test_run_continue_from_asks_a_follow_up_with_the_earlier_turn_and_says_the_repl_is_gone(
        model_server, tmp_path):
    home = tmp_path / "home"
    context = tmp_path / "notes.txt"
    context.write_text("alpha beta gamma", encoding="utf-8")
    model_server.script("cli-first", [repl("x = 1"), "FINAL(three words)"])
    first = rlm_mcp(model_server, home, "run", "--json", "--model", "openai/cli-first", "--context", str(context),
                    "How many words?")
    assert first.returncode == 0, first.stderr
    first_id = json.loads(first.stdout)["run_id"]
    model_server.script("cli-second", ["FINAL(the first word is alpha)"])
    follow = rlm_mcp(model_server, home, "run", "--json", "--model", "openai/cli-second", "--continue-from", first_id,
                     "Which word comes first?")
    assert follow.returncode == 0, follow.stderr
    result = json.loads(follow.stdout)
    assert (result["answer"], result["continued_from"], result["partial"]) == ("the first word is alpha", first_id,
                                                                                False)
    # One process per command: the earlier REPL cannot survive, and the result says so.
    assert any(f"the sandbox of run {first_id} is gone" in note for note in result["notes"])
    assert "Traceback" not in follow.stderr


def test_run_refuses_bad_continuations_and_prompt_files_in_one_line(model_server, tmp_path):
    home = tmp_path / "home"
    assert_one_error_line(rlm_mcp(model_server, home, "run", "a question"), "--context is required")
    assert_one_error_line(rlm_mcp(model_server, home, "run", "--continue-from", "run-20200101-000000-abcdef", "q"),
                          "no run run-20200101-000000-abcdef")
    template = tmp_path / "prompt.txt"
    template.write_text("About {context_kind}", encoding="utf-8")
    assert_one_error_line(rlm_mcp(model_server, home, "run", "--system-prompt-file", str(template), "--context",
                                  str(template), "q"), "unknown placeholder(s) {context_kind}")
    assert_one_error_line(rlm_mcp(model_server, home, "run", "--system-prompt-file", str(tmp_path / "none.txt"),
                                  "--context", str(template), "q"), "--system-prompt-file: cannot read")


def test_run_with_a_system_prompt_file_sends_it_filled(recording, tmp_path):
    template = tmp_path / "prompt.txt"
    text = "Mine: {context_type}, {context_total_chars} chars."
    template.write_text(text, encoding="utf-8")
    recording.script("cli-prompt", ["FINAL(ok)"])
    done = rlm_mcp(recording, tmp_path / "home", "run", "--model", "openai/cli-prompt", "--system-prompt-file",
                   str(template), "--context", str(template), "q")
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
    [body] = [b for b in recording.stats.requests if b["model"] == "cli-prompt"]
    assert body["messages"][0]["content"] == f"Mine: text, {len(text)} chars."  # its own file as the context
