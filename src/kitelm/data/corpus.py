"""Text corpora as lists of documents, split into train/validation by file, with a fingerprint.

The built-in corpus is the source code of the running Python's standard library (no test folders, no
site-packages): ≈11 MB of permissively licensed Python, present on every machine that runs kitelm.
`--data PATH` takes a text file, a folder (all text files below it) or a glob.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

VALIDATION_PERCENT = 5
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".json", ".html", ".css", ".tex",
                 ".java", ".go", ".rs", ".sh", ".yaml", ".yml", ".toml", ".csv", ".xml", ""}


@dataclass(frozen=True)
class Document:
    path: str  # relative path: the identity used for the split and the fingerprint
    text: str


@dataclass
class Corpus:
    name: str
    train: list[Document]
    validation: list[Document]
    fingerprint: dict

    def text(self, split: str) -> str:
        return "".join(d.text for d in (self.train if split == "train" else self.validation))


def is_validation(relpath: str) -> bool:
    """Stable split by file: sha256 of the relative path, 5 % to validation."""
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def fingerprint(name: str, docs: list[Document]) -> dict:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.path.encode() + b"\0" + d.text.encode("utf-8", "surrogatepass") + b"\0")
    return {"corpus": name, "python": sys.version.split()[0], "files": len(docs),
            "chars": sum(len(d.text) for d in docs), "sha256": h.hexdigest()}


def _read_documents(root: Path, files: list[Path]) -> list[Document]:
    docs = []
    for f in sorted(files):
        try:
            text = f.read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: not text
        if text:
            docs.append(Document(f.relative_to(root).as_posix() if root in f.parents else f.name, text))
    return docs


def split_documents(name: str, docs: list[Document]) -> Corpus:
    """Split by file hash; a corpus of one document (or with no file hashed to validation) gives its last 5 % of
    characters, at a line boundary, to validation."""
    if not docs:
        raise DataError(f"corpus {name!r} holds no readable UTF-8 text; point --data at text files")
    train = [d for d in docs if not is_validation(d.path)]
    val = [d for d in docs if is_validation(d.path)]
    if not val or not train:
        big = max(docs, key=lambda d: len(d.text))
        cut = big.text.rfind("\n", 0, len(big.text) * (100 - VALIDATION_PERCENT) // 100) + 1 or \
            len(big.text) * (100 - VALIDATION_PERCENT) // 100
        train = [d for d in docs if d is not big] + [Document(big.path, big.text[:cut])]
        val = [Document(big.path + "#validation", big.text[cut:])]
    return Corpus(name, train, val, fingerprint(name, docs))


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.endswith("_test"))
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return root, files


def load_stdlib_corpus() -> Corpus:
    """The default corpus: every UTF-8 `.py` file of the running interpreter's standard library, tests excluded."""
    root, files = stdlib_files()
    return split_documents("python-stdlib", _read_documents(root, files))


def load_corpus(data: str | None) -> Corpus:
    """`None` → the standard-library corpus; else a file, a folder (recursively, text-like files) or a glob."""
    if data is None:
        return load_stdlib_corpus()
    path = Path(data).expanduser()
    if path.is_file():
        root, files = path.parent, [path]
    elif path.is_dir():
        root = path
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    else:
        matches = [Path(p) for p in glob.glob(data, recursive=True) if Path(p).is_file()]
        if not matches:
            raise DataError(f"--data {data}: no such file, folder or glob match; give a text file, a folder or a glob")
        root, files = Path(os.path.commonpath([str(p.parent.resolve()) for p in matches])), \
            [p.resolve() for p in matches]
    docs = _read_documents(root.resolve(), [f.resolve() for f in files])
    if not docs:
        raise DataError(f"--data {data}: found no non-empty UTF-8 text; point it at text files")
    return split_documents(str(path), docs)
