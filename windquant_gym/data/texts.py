"""``load_texts``: offline corpora, local text, and ``datasets`` specs, as lists of documents.

Bundled corpora are split into disjoint ``calibration`` and ``eval`` documents by a fixed
rule (every fifth document, starting at the fifth, is ``eval``), so calibration text never
leaks into held-out evaluation and both spread over the whole corpus.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
from pathlib import Path
from typing import List

from ..errors import DataError, MissingDependencyError, UnknownNameError

SPLITS = ("calibration", "eval", "all")
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_PYDOCS = "/usr/share/doc/python3.11/html/_sources"
_MIN_ARTICLE_CHARS = 500


@functools.lru_cache(maxsize=1)
def _wiki_sample() -> tuple:
    """105 Wikipedia articles (2016 dump) shipped as gensim's test data (CC BY-SA 3.0)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise MissingDependencyError("The 'wiki-sample' corpus ships with gensim: pip install gensim")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    import bz2

    path = Path(spec.origin).parent / "test" / "test_data" / _WIKI_FILE
    articles = []
    with bz2.open(path, "rb") as handle:
        for title, text, _page_id in extract_pages(handle):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            plain = filter_wiki(text)
            plain = re.sub(r"'{2,}", "", plain)  # bold/italic marks filter_wiki leaves
            plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
            if len(plain) > _MIN_ARTICLE_CHARS:
                articles.append(f"{title}\n\n{plain}")
    return tuple(articles)


@functools.lru_cache(maxsize=1)
def _python_docs() -> tuple:
    """The Python 3.11 documentation's reST sources (PSF-2.0), one document per page."""
    files = sorted(glob.glob(os.path.join(_PYDOCS, "**", "*.txt"), recursive=True))
    if not files:
        raise MissingDependencyError(
            "The 'python-docs' corpus is the Debian package python3.11-doc: apt-get install -y python3.11-doc"
        )
    return tuple(text for text in (Path(f).read_text(errors="replace").strip() for f in files) if text)


def _local(path: Path) -> tuple:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".rst") and p.is_file())
        return tuple(t for t in (p.read_text(errors="replace").strip() for p in files) if t)
    text = path.read_text(errors="replace")
    # One file: its blank-line separated paragraphs, grouped into ~2000 character documents.
    documents, current = [], ""
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= 2000:
            documents.append(current)
            current = ""
    if current:
        documents.append(current)
    return tuple(documents)


def _datasets(spec: str, split: str) -> tuple:
    """``hf:NAME[:CONFIG][@SPLIT]``, e.g. ``hf:wikitext:wikitext-2-raw-v1@test``."""
    if importlib.util.find_spec("datasets") is None:
        raise MissingDependencyError("Loading a datasets spec needs datasets: pip install datasets")
    import datasets

    body, _, hf_split = spec[3:].partition("@")
    name, _, config = body.partition(":")
    data = datasets.load_dataset(name, config or None, split=hf_split or ("test" if split == "eval" else "train"))
    column = "text" if "text" in data.column_names else next(
        c for c in data.column_names if isinstance(data[0][c], str)
    )
    return tuple(t for t in data[column] if t and t.strip())


CORPORA = {"wiki-sample": _wiki_sample, "python-docs": _python_docs}


def _split(documents: tuple, split: str) -> List[str]:
    if split == "all":
        return list(documents)
    if len(documents) < 2:
        return list(documents)  # too few to split; both splits see the one document
    held_out = split == "eval"
    return [d for i, d in enumerate(documents) if (i % 5 == 4) == held_out]


def load_texts(name_or_path: str, split: str = "calibration") -> List[str]:
    """Documents of a corpus: ``"wiki-sample"``, ``"python-docs"``, a local text file or
    folder, or a ``datasets`` spec ``"hf:NAME[:CONFIG][@SPLIT]"`` (whose own split is used
    as is). ``split``: ``"calibration"``, ``"eval"`` or ``"all"``."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}.")
    name = str(name_or_path)
    if not name.strip():
        # Path("") is the working directory: never read it by accident.
        raise DataError(
            f"The corpus name or path is empty ({name_or_path!r}); use {', '.join(sorted(CORPORA))}, a local "
            "text file or folder, or pass the documents themselves as a list of strings."
        )
    if name in CORPORA:
        documents = _split(CORPORA[name](), split)
    elif name.startswith("hf:"):
        documents = list(_datasets(name, split))
    elif Path(name).exists():
        documents = _split(_local(Path(name)), split)
    else:
        raise UnknownNameError(
            f"Unknown corpus {name!r}: use {', '.join(sorted(CORPORA))}, a local text file or folder, "
            "or a datasets spec like 'hf:wikitext:wikitext-2-raw-v1@test'. To calibrate on text of your "
            "own, pass it as a list of strings."
        )
    if not documents:
        raise DataError(f"Corpus {name!r} (split {split!r}) holds no text; give a file or folder with text in it.")
    return documents
