"""The chapter notebooks listed in _toc.yml, in order (`python tests/toc.py` prints them)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _files(entries: list[dict]) -> list[str]:
    out = []
    for entry in entries:
        if "file" in entry:
            out.append(entry["file"])
        for key in ("chapters", "sections"):
            out += _files(entry.get(key, []))
        for part in entry.get("parts", []):
            out += _files(part.get("chapters", []))
    return out


def toc_files() -> list[str]:
    """Every document in the table of contents (root first), as paths without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"], *_files([toc])]


def notebooks() -> list[Path]:
    """The chapter notebooks (documents in the TOC that are .ipynb files)."""
    paths = [ROOT / f"{name}.ipynb" for name in toc_files()]
    return [p for p in paths if p.exists()]


if __name__ == "__main__":
    print(" ".join(str(p.relative_to(ROOT)) for p in notebooks()))
