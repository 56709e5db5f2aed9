"""The repository's own source files, for the tests that check a contract has one definition."""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_sources(top_dirs: tuple[str, ...], suffixes: tuple[str, ...] = (".py",)) -> list[tuple[str, str]]:
    """(repo-relative path, text) of every file under `top_dirs` ending in `suffixes`, caches and hidden
    directories skipped, in walk order."""
    out = []
    for top in top_dirs:
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
            for name in filenames:
                if name.endswith(suffixes):
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8") as f:
                        out.append((os.path.relpath(path, REPO).replace(os.sep, "/"), f.read()))
    return out
