"""The context store: content addressing, atomic streaming loads, directories, limits, peek."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rlm_mcp.config import Settings
from rlm_mcp.errors import ContextError
from rlm_mcp.sandbox.worker import PendingCalls, Repl
from rlm_mcp.store import ChunkSizes, ContextStore, HostFiles
from rlm_mcp.store import io as store_io

REPO = Path(__file__).resolve().parents[2]


def make_store(tmp_path: Path, *, sizes: ChunkSizes = ChunkSizes(), files: HostFiles | None = None,
               **overrides: object) -> ContextStore:
    return ContextStore(Settings(home=tmp_path / "home", **overrides), sizes=sizes, files=files)  # type: ignore[arg-type]


def handle_dirs(store: ContextStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith("ctx_"))


def temp_dirs(store: ContextStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name.startswith("."))


def sandbox_view(store: ContextStore, handle: str) -> tuple[object, list[str]]:
    """The context exactly as the sandbox worker loads it."""
    repl = Repl(None, PendingCalls())  # type: ignore[arg-type]
    context_file = store.context_file(handle)
    repl.load_context(str(context_file.path), context_file.kind)
    return repl.context, repl.context_paths


@pytest.fixture
def store(tmp_path: Path) -> ContextStore:
    return make_store(tmp_path)


@pytest.fixture
def small_steps() -> ChunkSizes:
    """Tiny chunks, index interval and read blocks so every boundary case is exercised."""
    return ChunkSizes(read=5, index_interval=7, peek_block=3, sniff=4)


# ----- text, handles, persistence ---------------------------------------------------------------


def test_load_text_reports_everything(store: ContextStore) -> None:
    text = "line one\r\nline two \u00e9\u20ac\U0001f600\n" + "x" * 400
    info = store.load_text(text, name="notes")
    data = text.encode("utf-8")
    import hashlib
    sha = hashlib.sha256(data).hexdigest()
    assert info.handle == "ctx_" + hashlib.sha256(f"text:{sha}".encode()).hexdigest()[:16] and info.sha256 == sha
    assert (info.kind, info.name, info.source) == ("text", "notes", "inline text")
    assert info.characters == len(text) and info.bytes == len(data)
    assert info.documents == 0 and info.document_lengths == []
    assert info.preview == text[:300]
    assert info.created_at.endswith("+00:00")
    assert not info.decoding_replaced
    context, _ = sandbox_view(store, info.handle)
    assert context == text  # \r\n kept exactly


def test_same_content_same_handle_single_copy(store: ContextStore, tmp_path: Path) -> None:
    first = store.load_text("same words", name="first")
    second = store.load_text("same words", name="second")
    path = tmp_path / "same.txt"
    path.write_bytes(b"same words")
    third = store.load_path(str(path))
    assert first.handle == second.handle == third.handle
    assert handle_dirs(store) == [first.handle]
    assert temp_dirs(store) == []
    assert second.name == "first" and any("already stored" in note for note in second.notes)
    assert store.get(first.handle).aliases == ["second", "same.txt"]
    assert store.load_text("other words").handle != first.handle


def test_handles_survive_restart(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    info = store.load_text("persistent \u00e9" * 50, name="keep")
    again = make_store(tmp_path)
    assert again.get(info.handle) == info
    assert [i.handle for i in again.list()] == [info.handle]
    assert again.peek(info.handle, 0, 11).text == "persistent \u00e9"[:11]
    assert again.context_file(info.handle).path.read_text(encoding="utf-8") == "persistent \u00e9" * 50


def test_list_and_delete(store: ContextStore) -> None:
    a = store.load_text("alpha", name="a")
    b = store.load_text("beta", name="b")
    assert {i.handle for i in store.list()} == {a.handle, b.handle}
    assert store.delete(a.handle) == a
    assert [i.handle for i in store.list()] == [b.handle]
    assert handle_dirs(store) == [b.handle] and temp_dirs(store) == []
    with pytest.raises(ContextError, match="unknown context handle"):
        store.get(a.handle)


@pytest.mark.parametrize("handle", ["ctx_0000000000000000", "../../etc", "ctx_ABC", ""])
def test_unknown_handle_says_what_to_do(store: ContextStore, handle: str) -> None:
    expected = f"unknown context handle {handle!r}: call rlm_list_contexts to see the handles, or rlm_load_context to load one"
    for call in (store.get, store.delete, store.peek, store.context_file):
        with pytest.raises(ContextError) as caught:
            call(handle)
        assert str(caught.value) == expected


def test_inline_text_limit(tmp_path: Path) -> None:
    store = make_store(tmp_path, max_inline_chars=10)
    store.load_text("0123456789")
    with pytest.raises(ContextError, match="over the 10-character limit.*save it to a file and load it with path"):
        store.load_text("0123456789A")


def test_inline_lone_surrogates_are_replaced(store: ContextStore) -> None:
    info = store.load_text("a\ud800b")
    assert info.decoding_replaced and info.characters == 3
    assert sandbox_view(store, info.handle)[0] == "a\ufffdb"


def test_empty_text_is_allowed_and_noted(store: ContextStore) -> None:
    info = store.load_text("")
    assert info.characters == 0 and "the context is empty" in info.notes
    assert store.peek(info.handle).text == "" and store.peek(info.handle).next_start is None


# ----- atomicity and concurrency ----------------------------------------------------------------


class FailingStream(io.RawIOBase):
    def __init__(self, good_chunks: int) -> None:
        self.left = good_chunks

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.left == 0:
            raise RuntimeError("source broke")
        self.left -= 1
        return b"chunk of text " * 100


def test_failing_source_leaves_nothing(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with pytest.raises(RuntimeError, match="source broke"):
        store.load_stream(FailingStream(3), name="broken", source="stdin")
    assert handle_dirs(store) == [] and temp_dirs(store) == []
    assert make_store(tmp_path).list() == []


def test_crashed_process_leaves_no_handle_and_temp_is_cleaned(tmp_path: Path) -> None:
    home = tmp_path / "home"
    script = f"""
import io, os
from pathlib import Path
from rlm_mcp.config import Settings
from rlm_mcp.store import ContextStore

class Dying(io.RawIOBase):
    calls = 0
    def readable(self): return True
    def read(self, size=-1):
        Dying.calls += 1
        if Dying.calls == 3:
            os._exit(9)          # the process dies mid-load: no cleanup runs
        return b"x" * 100_000

ContextStore(Settings(home=Path({str(home)!r}))).load_stream(Dying(), name="n", source="stdin")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=60)
    assert result.returncode == 9
    root = home / "contexts"
    leftovers = [p.name for p in root.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-")  # the crash left a temp dir...
    store = ContextStore(Settings(home=home))                         # ...which a new store removes
    assert list(root.iterdir()) == [] and store.list() == []


def test_startup_keeps_temp_dirs_of_loads_in_progress(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    writer = store_io.ContentWriter(store.root, "text")
    try:
        make_store(tmp_path)
        assert writer.dir.exists()
    finally:
        writer.discard()
    assert temp_dirs(store) == []


def test_concurrent_loads_of_same_content(tmp_path: Path) -> None:
    stores = [make_store(tmp_path) for _ in range(6)]
    barrier = threading.Barrier(len(stores), timeout=30)
    results: list[str] = []
    errors: list[BaseException] = []

    def load(store: ContextStore, number: int) -> None:
        try:
            barrier.wait()
            results.append(store.load_text("shared content " * 10_000, name=f"n{number}").handle)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(s, i)) for i, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(set(results)) == 1 and len(results) == len(stores)
    assert handle_dirs(stores[0]) == results[:1] and temp_dirs(stores[0]) == []
    info = stores[0].get(results[0])
    assert len(info.aliases) == len(stores) - 1


class RivalWinsTheRename(HostFiles):
    """Lets a rival store load the same content between the existence check and the rename."""

    def __init__(self, rival: ContextStore) -> None:
        self.rival = rival
        self.raced = False

    def rename(self, source: Path, target: Path) -> None:
        if not self.raced and source.name.startswith(".tmp-") and target.name.startswith("ctx_"):
            self.raced = True
            self.rival.load_text("contended", name="rival")  # wins the race between check and rename
        super().rename(source, target)


def test_rename_race_discards_the_losing_copy(tmp_path: Path) -> None:
    files = RivalWinsTheRename(make_store(tmp_path))
    store = make_store(tmp_path, files=files)
    info = store.load_text("contended", name="mine")
    assert files.raced and info.name == "rival" and info.aliases == ["mine"]
    assert handle_dirs(store) == [info.handle] and temp_dirs(store) == []


# ----- streaming, index, peek --------------------------------------------------------------------


def test_sparse_index_and_peek_across_multibyte(tmp_path: Path, small_steps: ChunkSizes) -> None:
    store = make_store(tmp_path, sizes=small_steps)
    text = "a\u00e9\u20ac\U0001f600\u4e2d\r\n" * 40
    source = tmp_path / "multi.txt"
    source.write_bytes(text.encode("utf-8"))
    info = store.load_path(str(source))
    assert info.characters == len(text) and info.bytes == len(text.encode("utf-8"))
    meta = json.loads((store.root / info.handle / "meta.json").read_text(encoding="utf-8"))
    stored = (store.root / info.handle / "content.txt").read_bytes()
    assert stored == source.read_bytes()
    assert len(meta["index"]) > 10
    for char_offset, byte_offset in meta["index"]:
        assert len(stored[:byte_offset].decode("utf-8")) == char_offset
    for start in range(0, len(text) + 1, 3):
        for length in (1, 2, 5, 17):
            page = store.peek(info.handle, start, length)
            assert page.text == text[start:start + length]
            assert page.end == min(len(text), start + length) and page.total == len(text)
            assert page.next_start == (page.end if page.end < len(text) else None)
    pages, start = [], 0
    while start is not None:
        page = store.peek(info.handle, start, 13)
        pages.append(page.text)
        start = page.next_start
    assert "".join(pages) == text


def test_chunked_decoding_matches_whole_decoding(tmp_path: Path, small_steps: ChunkSizes) -> None:
    import random
    rng = random.Random(7)
    pieces = ["a", "\r\n", "\u00e9", "\u20ac", "\U0001f600"]
    store = make_store(tmp_path, sizes=small_steps)
    for trial in range(30):
        raw = b"".join(rng.choice(pieces).encode() if rng.random() < 0.9 else bytes([rng.randrange(0x80, 0x100)])
                       for _ in range(rng.randrange(40, 120)))
        raw = b"text " + raw          # keep the first bytes (the binary sniff) plain
        info = store.load_stream(io.BytesIO(raw), name=f"t{trial}", source="stdin")
        expected = raw.decode("utf-8", "replace")
        assert sandbox_view(store, info.handle)[0] == expected
        assert info.characters == len(expected)
        assert info.decoding_replaced == ("\ufffd" in expected)


def test_damaged_handle_directory_is_replaced(store: ContextStore) -> None:
    info = store.load_text("will be damaged")
    (store.root / info.handle / "meta.json").write_text("{not json")
    with pytest.raises(ContextError, match="unknown context handle"):
        store.get(info.handle)
    assert store.list() == []
    again = store.load_text("will be damaged")
    assert again.handle == info.handle and store.get(info.handle).characters == 15
    assert temp_dirs(store) == []


def test_peek_arguments(store: ContextStore) -> None:
    info = store.load_text("y" * 30_000)
    assert len(store.peek(info.handle, 0, 50_000).text) == 20_000
    assert store.peek(info.handle, 30_000).text == ""
    with pytest.raises(ContextError, match="past the end.*use a start from 0 to 30,000"):
        store.peek(info.handle, 30_001)
    with pytest.raises(ContextError, match="start >= 0 and length >= 1"):
        store.peek(info.handle, -1)
    with pytest.raises(ContextError, match="text context with no documents: peek it without document"):
        store.peek(info.handle, 0, 10, document=0)


def test_non_utf8_decodes_with_replacement(store: ContextStore, tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9 of a long enough sentence".encode("latin-1"))
    info = store.load_path(str(path))
    assert info.decoding_replaced
    assert any("replaced with U+FFFD" in note for note in info.notes)
    assert sandbox_view(store, info.handle)[0].startswith("caf\ufffd cr\ufffdme")


def test_utf16_with_bom_is_decoded(store: ContextStore, tmp_path: Path) -> None:
    path = tmp_path / "wide.txt"
    path.write_bytes("hello w\u00f6rld\r\n".encode("utf-16"))
    info = store.load_path(str(path))
    assert sandbox_view(store, info.handle)[0] == "hello w\u00f6rld\r\n"
    assert any("UTF-16" in note for note in info.notes) and not info.decoding_replaced


def test_stream_load_and_cap(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    info = store.load_stream(io.BytesIO(b"from stdin\n" * 1000), name="stdin", source="stdin")
    assert (info.name, info.source, info.characters) == ("stdin", "stdin", 11_000)
    with pytest.raises(ContextError, match=r"stdin is larger, over the 5,000-byte limit.*nothing was stored"):
        store.load_stream(io.BytesIO(b"z" * 10_000), name="big", source="stdin", max_bytes=5000)
    assert handle_dirs(store) == [info.handle] and temp_dirs(store) == []


def test_single_file_over_cap_and_max_bytes_rules(tmp_path: Path) -> None:
    store = make_store(tmp_path, max_context_bytes=1000)
    path = tmp_path / "big.txt"
    path.write_text("b" * 1500)
    with pytest.raises(ContextError, match="is 1,500 bytes, over the 1,000-byte limit.*RLM_MCP_MAX_CONTEXT_BYTES"):
        store.load_path(str(path))
    with pytest.raises(ContextError, match="pass a larger max_bytes \\(the server allows up to 1,000\\)"):
        store.load_path(str(path), max_bytes=100)
    with pytest.raises(ContextError, match="max_bytes must be a positive"):
        store.load_path(str(path), max_bytes=0)
    path.write_text("b" * 900)
    assert store.load_path(str(path), max_bytes=10**12).characters == 900  # clamped to the server cap
    assert temp_dirs(store) == []


def test_binary_file_and_stream_refused(store: ContextStore, tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    with pytest.raises(ContextError, match="looks binary \\(it contains NUL bytes\\).*Convert it to text"):
        store.load_path(str(path))
    with pytest.raises(ContextError, match="looks binary"):
        store.load_stream(io.BytesIO(bytes(range(128, 256)) * 100), name="s", source="stdin")
    assert store.list() == [] and temp_dirs(store) == []


# ----- paths: errors and allowed roots ---------------------------------------------------------


class DenyOpen(HostFiles):
    """Refuses to open one file name as the kernel refuses an unreadable file (tests run as root)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def open(self, path: Path, flags: int) -> int:
        if path.name == self.name:
            raise PermissionError(13, "Permission denied")
        return super().open(path, flags)


def test_path_errors(store: ContextStore, tmp_path: Path) -> None:
    with pytest.raises(ContextError, match="no such file or directory: .*pass an absolute one"):
        store.load_path(str(tmp_path / "missing.txt"))
    with pytest.raises(ContextError, match="path is empty"):
        store.load_path("  ")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ContextError, match="not a regular file or directory \\(a device, FIFO or socket\\)"):
        store.load_path(str(fifo))           # returns at once: the FIFO is never read
    with pytest.raises(ContextError, match="not a regular file or directory"):
        store.load_path("/dev/null")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ContextError, match="has no files to load \\(it is empty\\)"):
        store.load_path(str(empty))
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")
    guarded = make_store(tmp_path, files=DenyOpen("locked.txt"))
    with pytest.raises(ContextError, match="permission denied; make it readable"):
        guarded.load_path(str(locked))
    assert store.list() == [] and temp_dirs(store) == []


def test_relative_paths_resolve_against_cwd(store: ContextStore, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "rel.txt").write_text("relative")
    monkeypatch.chdir(tmp_path)
    assert store.load_path("rel.txt").source == str(tmp_path.resolve() / "rel.txt")


def test_allowed_roots(tmp_path: Path) -> None:
    inside = tmp_path / "allowed"
    outside = tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (inside / "ok.txt").write_text("fine")
    (outside / "secret.txt").write_text("secret")
    (inside / "escape.txt").symlink_to(outside / "secret.txt")
    (inside / "escape_dir").symlink_to(outside, target_is_directory=True)
    store = make_store(tmp_path, allowed_roots=(inside,))
    assert store.load_path(str(inside / "ok.txt")).characters == 4
    for path in (outside / "secret.txt", inside / "escape.txt", inside / "escape_dir", inside / ".." / "outside"):
        with pytest.raises(ContextError, match=f"outside the allowed roots \\({inside}\\).*RLM_MCP_ALLOWED_ROOTS"):
            store.load_path(str(path))
    info = store.load_path(str(inside))
    paths = sandbox_view(store, info.handle)[1]
    assert paths == ["ok.txt"]
    assert info.skipped["outside_roots"] == 1 and info.skipped["symlink"] == 1


# ----- directories ------------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    files = {
        "README.md": "# readme\n",
        "src/app.py": "print('hi')\r\n",
        "src/util/helpers.py": 'quote " backslash \\ tab\t ctrl\x01 sep\u2028 \u00e9\U0001f600\n',
        "src/data.json": '{"k": 1}\n',
        "docs/guide.txt": "guide\n",
        "tests/test_app.py": "assert True\n",
        "a-b.txt": "dash sorts before slash\n",
        "empty.txt": "",
        ".git/config": "[core]\n",
        "node_modules/lib/index.js": "module.exports = 1\n",
        "pkg/__pycache__/x.cpython-311.pyc": "cached",
        "pkg/dist/out.txt": "built",
        "pkg/.DS_Store": "mac",
        "pkg/.venv/lib.py": "venv",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    (root / "logo.png").write_bytes(b"\x89PNG\x00\x00binary")


def test_directory_documents(store: ContextStore, tmp_path: Path) -> None:
    tree = tmp_path / "proj"
    make_tree(tree)
    (tree / "src" / "link.py").symlink_to(tree / "src" / "app.py")
    (tree / "loop").symlink_to(tree, target_is_directory=True)
    info = store.load_path(str(tree))
    texts, paths = sandbox_view(store, info.handle)
    assert paths == ["README.md", "a-b.txt", "docs/guide.txt", "empty.txt", "src/app.py", "src/data.json",
                     "src/link.py", "src/util/helpers.py", "tests/test_app.py"]
    assert texts[paths.index("src/app.py")] == "print('hi')\r\n"
    assert texts[paths.index("src/link.py")] == "print('hi')\r\n"
    helpers = 'quote " backslash \\ tab\t ctrl\x01 sep\u2028 \u00e9\U0001f600\n'
    assert texts[paths.index("src/util/helpers.py")] == helpers
    assert (info.kind, info.name, info.source, info.documents) == ("documents", "proj", str(tree.resolve()), 9)
    assert info.characters == sum(map(len, texts)) and info.document_lengths == [len(t) for t in texts]
    assert info.skipped["binary"] == 1 and info.skipped["ignored_dir"] == 5
    assert info.skipped["ignored_file"] == 1 and info.skipped["symlink"] == 1
    assert "1 binary file skipped" in info.notes
    view = "".join(f"=== {p} ===\n{t}\n" for p, t in zip(paths, texts))
    assert info.preview == view[:300]


def test_directory_peek_view_and_documents(tmp_path: Path, small_steps: ChunkSizes) -> None:
    store = make_store(tmp_path, sizes=small_steps)
    tree = tmp_path / "proj"
    make_tree(tree)
    info = store.load_path(str(tree))
    texts, paths = sandbox_view(store, info.handle)
    view = "".join(f"=== {p} ===\n{t}\n" for p, t in zip(paths, texts))
    for start in range(0, len(view) + 1, 2):
        page = store.peek(info.handle, start, 9)
        assert page.text == view[start:start + 9] and page.total == len(view)
    assert store.peek(info.handle, 0, 5).document_path == "README.md"
    for number, text in enumerate(texts):
        for start in range(0, len(text) + 1):
            page = store.peek(info.handle, start, 4, document=number)
            assert page.text == text[start:start + 4]
            assert (page.document, page.document_path, page.total) == (number, paths[number], len(text))
    with pytest.raises(ContextError, match="has 8 documents, numbered 0 to 7; there is no document 8"):
        store.peek(info.handle, 0, 10, document=8)


def test_directory_include_exclude(store: ContextStore, tmp_path: Path) -> None:
    tree = tmp_path / "proj"
    make_tree(tree)
    only_py = store.load_path(str(tree), include=["*.py"])
    assert sandbox_view(store, only_py.handle)[1] == ["src/app.py", "src/util/helpers.py", "tests/test_app.py"]
    no_tests = store.load_path(str(tree), include=["src/**", "*.md"], exclude=["tests", "*.json", "src/util"])
    assert sandbox_view(store, no_tests.handle)[1] == ["README.md", "src/app.py"]
    assert no_tests.skipped["excluded"] > 0
    assert store.load_path(str(tree), include="*.md").handle == store.load_path(str(tree), include=["*.md"]).handle
    with pytest.raises(ContextError, match="has no files to load.*left out by include/exclude.*check the include/exclude"):
        store.load_path(str(tree), include=["*.rs"])


def test_directory_caps_refuse_whole(tmp_path: Path) -> None:
    tree = tmp_path / "proj"
    make_tree(tree)
    store = make_store(tmp_path, max_files=3)
    with pytest.raises(ContextError) as caught:
        store.load_path(str(tree))
    message = str(caught.value)
    assert "holds 9 files and 130 bytes" in message and "limit of 3 files" in message and "nothing was loaded" in message
    assert "include" in message and "exclude" in message and "Largest parts: src/ (3 files, 67 bytes), a-b.txt (1 file, 24 bytes)" in message
    store = make_store(tmp_path, max_context_bytes=50)
    with pytest.raises(ContextError, match="over the limit of 20,000 files and 50 bytes"):
        store.load_path(str(tree))
    store = make_store(tmp_path)
    with pytest.raises(ContextError, match="pass a larger max_bytes"):
        store.load_path(str(tree), max_bytes=50)
    assert store.list() == [] and temp_dirs(store) == []
    narrowed = make_store(tmp_path, max_files=3).load_path(str(tree), include=["src/*.py"])
    assert sandbox_view(store, narrowed.handle)[1] == ["src/app.py", "src/util/helpers.py"]  # fnmatch: * spans /


def test_directory_with_only_binaries(store: ContextStore, tmp_path: Path) -> None:
    tree = tmp_path / "bins"
    tree.mkdir()
    (tree / "a.bin").write_bytes(b"\x00\x01")
    (tree / "b.bin").write_bytes(b"\x00\x02")
    with pytest.raises(ContextError, match="no text files to load \\(2 binary files skipped\\)"):
        store.load_path(str(tree))
    assert store.list() == [] and temp_dirs(store) == []


def test_directory_non_utf8_and_utf16(store: ContextStore, tmp_path: Path) -> None:
    tree = tmp_path / "enc"
    tree.mkdir()
    (tree / "latin.txt").write_bytes("Gr\u00fc\u00dfe aus K\u00f6ln, ein ganz normaler Satz".encode("latin-1"))
    (tree / "wide.txt").write_bytes("wide \u00e9".encode("utf-16"))
    info = store.load_path(str(tree))
    texts, _ = sandbox_view(store, info.handle)
    assert texts == ["Gr\ufffd\ufffde aus K\ufffdln, ein ganz normaler Satz", "wide \u00e9"]
    assert info.decoding_replaced


def test_combine(store: ContextStore, tmp_path: Path) -> None:
    tree = tmp_path / "proj"
    make_tree(tree)
    docs = store.load_path(str(tree), include=["*.md", "docs/*"])
    text = store.load_text("plain \u00e9\r\n", name="note")
    combined = store.combine([text.handle, docs.handle], name="both")
    texts, paths = sandbox_view(store, combined.handle)
    assert paths == ["note", "proj/README.md", "proj/docs/guide.txt"]
    assert texts == ["plain \u00e9\r\n", "# readme\n", "guide\n"]
    assert (combined.kind, combined.name, combined.documents) == ("documents", "both", 3)
    assert store.combine([text.handle, docs.handle]).handle == combined.handle
    assert handle_dirs(store).count(combined.handle) == 1
    with pytest.raises(ContextError, match="at least one handle"):
        store.combine([])
    with pytest.raises(ContextError, match="unknown context handle"):
        store.combine([text.handle, "ctx_ffffffffffffffff"])


def test_directory_skips_likely_secret_files_unless_loaded_by_path(store: ContextStore, tmp_path: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "app.py").write_text("print('hi')")
    for name in (".env", ".env.production", "server.pem", "id_rsa", "id_ed25519.pub"):
        (folder / name).write_text("SECRET=do-not-send")
    info = store.load_path(str(folder))
    assert info.documents == 1 and info.skipped["secret"] == 5
    assert any("likely secret file" in note for note in info.notes)
    direct = store.load_path(str(folder / ".env"))
    assert direct.characters == len("SECRET=do-not-send")


def test_text_with_the_same_bytes_as_a_document_list_is_a_different_context(store: ContextStore, tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha")
    docs = store.load_path(str(folder))
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(store.context_file(docs.handle).path.read_bytes())
    text = store.load_path(str(copy))
    assert (docs.kind, text.kind) == ("documents", "text")
    assert text.handle != docs.handle and text.sha256 == docs.sha256
    assert store.get(docs.handle).kind == "documents"


class SwapForSymlinkBeforeOpen(HostFiles):
    """Replaces the checked file with a symlink to ``target`` between the roots check and the open."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.swapped = False

    def open(self, path: Path, flags: int) -> int:
        if path.name == "report.txt" and not self.swapped:
            self.swapped = True
            path.unlink()
            path.symlink_to(self.target)
        return super().open(path, flags)


def test_a_file_swapped_for_a_symlink_out_of_the_roots_after_checking_is_not_read(tmp_path: Path) -> None:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir(), outside.mkdir()
    (outside / "secret.txt").write_text("outside the roots")
    (inside / "report.txt").write_text("inside the roots")
    files = SwapForSymlinkBeforeOpen(outside / "secret.txt")
    store = make_store(tmp_path, files=files, allowed_roots=(inside.resolve(),))
    with pytest.raises(ContextError, match="now points outside the allowed roots"):
        store.load_path(str(inside / "report.txt"))
    assert files.swapped and store.list() == [] and temp_dirs(store) == []


# ----- privacy and integrity ----------------------------------------------------------------------


def modes_under(root: Path) -> dict[str, str]:
    """Every path under ``root`` (itself included) with its permission bits, e.g. {"a/b": "0o600"}."""
    found = {".": oct(stat.S_IMODE(root.stat().st_mode))}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = oct(stat.S_IMODE(path.lstat().st_mode))
    return found


def test_the_store_is_private_to_the_server_user_whatever_the_umask(tmp_path: Path) -> None:
    """Contexts hold whatever users loaded: 0700 directories, 0600 files, even under umask 000."""
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "a.txt").write_text("alpha")
    (tmp_path / "one.txt").write_text("one file")
    previous = os.umask(0)
    try:
        store = make_store(tmp_path)
        text = store.load_text("inline words", name="inline")
        store.load_text("inline words", name="alias")  # rewrites meta.json with the alias
        docs = store.load_path(str(tmp_path / "repo"))
        store.load_path(str(tmp_path / "one.txt"))
        store.combine([text.handle, docs.handle])
    finally:
        os.umask(previous)
    home = tmp_path / "home"
    modes = modes_under(home)
    assert modes["."] == "0o700"
    wrong = {path: mode for path, mode in modes.items()
             if mode != ("0o700" if (home / path).is_dir() else "0o600")}
    assert wrong == {}, wrong
    assert sum(1 for path in modes if path.endswith("content.txt") or path.endswith("content.jsonl")) == 4


def test_an_existing_store_directory_is_made_private_but_a_chosen_home_is_left_alone(tmp_path: Path) -> None:
    home = tmp_path / "shared"
    (home / "contexts").mkdir(parents=True)
    os.chmod(home, 0o755)
    os.chmod(home / "contexts", 0o755)  # as an older version left it
    ContextStore(Settings(home=home))
    assert stat.S_IMODE((home / "contexts").stat().st_mode) == 0o700
    assert stat.S_IMODE(home.stat().st_mode) == 0o755  # RLM_MCP_HOME=/tmp must not make /tmp private


@pytest.mark.parametrize("tamper", ["content", "content and meta.json"])
def test_verify_catches_a_context_altered_after_loading(store: ContextStore, tamper: str) -> None:
    info = store.load_text("the secret code is GOOD-1", name="doc")
    store.verify(info.handle)  # untouched: passes
    content = store.context_file(info.handle).path
    altered = b"the secret code is EVIL-9"
    os.chmod(content, 0o600)
    content.write_bytes(altered)
    if tamper == "content and meta.json":  # a careful forger also fixes the recorded hash
        meta_path = content.parent / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["info"]["sha256"] = hashlib.sha256(altered).hexdigest()
        meta_path.write_text(json.dumps(meta))
    with pytest.raises(ContextError, match=rf"context {info.handle} \(doc\) was changed on disk after it was "
                                           r"loaded .* delete it with rlm_delete_context and load the input again"):
        store.verify(info.handle)

