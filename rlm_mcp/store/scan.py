"""Directory scanning for the context store: which files become documents, which are skipped
(binaries are found later, while reading), and the notes that explain the skips."""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path

IGNORED_DIRS = frozenset({
    ".git", ".hg", ".svn", ".bzr", "node_modules", "bower_components", "__pycache__", ".venv",
    "venv", ".tox", ".nox", "dist", "build", ".mypy_cache", ".pytest_cache", ".ruff_cache",
    ".idea", ".vscode", ".gradle", ".next", ".nuxt", ".terraform", ".eggs", ".cache",
})
IGNORED_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
# Files that usually hold credentials: a directory load would send them to the model provider.
SECRET_FILES = (".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_dsa*", "id_ecdsa*",
                "id_ed25519*", ".netrc", ".pgpass", ".npmrc", ".pypirc", "*.keystore", "credentials")
SKIP_KEYS = ("binary", "ignored_dir", "ignored_file", "secret", "excluded", "symlink", "outside_roots",
             "special", "unreadable", "over_file_cap", "over_byte_cap")


def matches_any(rel: str, patterns: list[str]) -> bool:
    """gitignore-like: a pattern without "/" matches any path component (``*.py``, ``tests``);
    one with "/" matches the relative path or one of its parent directories (``docs/**``).
    Matching is ``fnmatch`` on posix paths, so ``*`` also matches "/" (``src/*.py`` takes
    ``src/a/b.py`` too)."""
    parts = rel.split("/")
    for raw in patterns:
        pattern = raw.strip().removeprefix("./")
        if not pattern:
            continue
        if "/" not in pattern.rstrip("/"):
            name = pattern.rstrip("/")
            if any(fnmatch.fnmatchcase(part, name) for part in parts):
                return True
            continue
        if fnmatch.fnmatchcase(rel, pattern):
            return True
        base = pattern.rstrip("/").removesuffix("/**").rstrip("/")
        if any(fnmatch.fnmatchcase("/".join(parts[:i]), base) for i in range(1, len(parts) + 1)):
            return True
    return False


def inside_roots(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def _count(number: int, word: str, plural: str | None = None) -> str:
    return f"{number:,} {word if number == 1 else plural or word + 's'}"


def human_size(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GB"


class DirectoryScan:
    """The files of a directory tree that a load would include, with what was skipped."""

    def __init__(self, root: Path, include: list[str], exclude: list[str], roots: list[Path],
                 stop_after: int) -> None:
        self.files: list[tuple[str, Path]] = []
        self.total = 0
        self.incomplete = False
        self.skipped = {key: 0 for key in SKIP_KEYS}
        self.parts: dict[str, list[int]] = {}
        stack = [(root, "")]
        while stack and not self.incomplete:
            directory, prefix = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                self.skipped["unreadable"] += 1
                continue
            for entry in entries:
                rel = prefix + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name in IGNORED_DIRS or entry.name.endswith(".egg-info"):
                            self.skipped["ignored_dir"] += 1
                        elif exclude and matches_any(rel, exclude):
                            self.skipped["excluded"] += 1
                        else:
                            stack.append((Path(entry.path), rel + "/"))
                        continue
                    size = self._file_size(entry, roots)
                except OSError:
                    self.skipped["unreadable"] += 1
                    continue
                if size is None:
                    continue
                if entry.name in IGNORED_FILES:
                    self.skipped["ignored_file"] += 1
                elif any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in SECRET_FILES):
                    self.skipped["secret"] += 1
                elif (include and not matches_any(rel, include)) or (exclude and matches_any(rel, exclude)):
                    self.skipped["excluded"] += 1
                else:
                    self.files.append((rel, Path(entry.path)))
                    self.total += size
                    part = self.parts.setdefault(rel.split("/")[0] + ("/" if "/" in rel else ""), [0, 0])
                    part[0] += 1
                    part[1] += size
                    if len(self.files) >= stop_after:
                        self.incomplete = True
                        break
        self.files.sort()

    def _file_size(self, entry: os.DirEntry[str], roots: list[Path]) -> int | None:
        """Size of a loadable file entry, or None (counted as skipped)."""
        if entry.is_symlink():
            try:
                target = Path(entry.path).resolve(strict=True)
                info = target.stat()
            except (OSError, RuntimeError):
                self.skipped["symlink"] += 1
                return None
            if stat.S_ISDIR(info.st_mode):
                self.skipped["symlink"] += 1     # symlinked directories are never followed
                return None
            if roots and not inside_roots(target, roots):
                self.skipped["outside_roots"] += 1
                return None
        else:
            info = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode):
            self.skipped["special"] += 1
            return None
        return info.st_size

    def largest_parts(self, count: int = 5) -> str:
        ranked = sorted(self.parts.items(), key=lambda item: -item[1][1])[:count]
        return ", ".join(f"{name} ({_count(files, 'file')}, {human_size(size)})" for name, (files, size) in ranked)


def skip_notes(skipped: dict[str, int]) -> list[str]:
    words = {
        "binary": ("binary file", "skipped"),
        "ignored_dir": ("directory", "skipped by name (.git, node_modules, build, ...; load one by "
                        "its own path to include it)"),
        "ignored_file": ("system file", "skipped (.DS_Store, ...)"),
        "secret": ("likely secret file", "skipped (.env, *.pem, *.key, id_rsa, ...; load one by its "
                   "own path to include it)"),
        "excluded": ("file or directory", "left out by include/exclude"),
        "symlink": ("symlink", "skipped (symlinked directories are not followed; broken links)"),
        "outside_roots": ("symlink", "skipped: pointing outside the allowed roots"),
        "special": ("special file", "skipped (devices, FIFOs, sockets)"),
        "unreadable": ("unreadable file or directory", "skipped"),
    }
    plurals = {"directory": "directories", "file or directory": "files or directories",
               "unreadable file or directory": "unreadable files or directories"}
    return [f"{_count(skipped[key], word, plurals.get(word))} {text}"
            for key, (word, text) in words.items() if skipped.get(key)]
