"""Tokenise the user's files into token shards, in parallel processes.

Work units are byte ranges of JSONL files and row groups of Parquet files, taken in corpus
order; each unit becomes one shard, so the documents' order is the corpus order whatever
the number of processes. A row becomes one document:
- `text`: `row[text_field]` tokenised, plus EOS (the packer needs no EOS scan: document
  offsets are stored);
- `conversations`: `row["messages"]` rendered with the chat template, with a per-token
  target mask (engine/data/chat.py); media parts expanded to their placeholder tokens, counted
  from the files' headers (engine/data/conversation_media.py), their refs kept with the document.
Rows that cannot be used are counted by reason (or, strict, a one-line error).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import DataError
from .records import SkipCounter, iter_unit, work_units
from .token_shards import ShardWriter, write_meta
from .tokenizer import load_tokenizer

if TYPE_CHECKING:
    from .conversation_media import MediaPlan

log = logging.getLogger(__name__)

_BATCH_ROWS = 512
# Part of every prepared folder's name: bump it when the rules that turn rows into tokens change
# (chat encoding, media token counts from headers in media.py / conversation_media.py), so that
# folders prepared by an older engine are prepared again instead of having their samples dropped
# as "changed" when they are decoded. 2: clips count ceil(n / 160) log-mel frames.
PREPARED_FORMAT = 2


@dataclass(frozen=True)
class EncodeSpec:
    """All that decides the tokens of a row (and so names the cache entry)."""

    kind: str                      # text | conversations
    tokenizer: str                 # tokenizer.json, sentencepiece .model, or a folder
    text_field: str = "text"
    chat_template: Optional[str] = None  # a template file; None: the tokenizer folder's own
    train_on: str = "assistant"
    media: Optional["MediaPlan"] = None  # how the model reads media parts (None: it has no part for them)

    def fingerprint(self, files: list[Path]) -> str:
        """Changes when a file, the tokenizer, the template or an option changes."""
        h = hashlib.sha256(repr(sorted(asdict(self).items())).encode() + self.tokenizer_fingerprint().encode())
        h.update(f"format={PREPARED_FORMAT}".encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def tokenizer_fingerprint(self) -> str:
        """The tokenizer's and template's content (not their paths): a prepared folder made
        with another tokenizer is refused."""
        h = hashlib.sha256()
        tok = Path(self.tokenizer)
        names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json")
        for f in sorted(p for p in tok.iterdir() if p.name in names) if tok.is_dir() else [tok]:
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
        if self.chat_template:
            h.update(Path(self.chat_template).read_bytes())
        return h.hexdigest()[:16]


class Encoder:
    """Rows -> (ids, mask) under one EncodeSpec (built in each worker process)."""

    def __init__(self, spec: EncodeSpec):
        self.spec = spec
        self.tokenizer = load_tokenizer(spec.tokenizer)
        if spec.kind == "conversations":
            from .chat import ChatTemplate, load_chat_template, special_tokens

            folder = Path(spec.tokenizer) if Path(spec.tokenizer).is_dir() else Path(spec.tokenizer).parent
            source = Path(spec.chat_template).read_text() if spec.chat_template else load_chat_template(folder)
            if source is None:
                raise DataError(f"tokenizer {spec.tokenizer} has no chat template (chat_template.jinja or "
                                "tokenizer_config.json): set data.chat_template to a Jinja template file")
            self.template = ChatTemplate(source, special_tokens(folder))
        elif self.tokenizer.eos_id is None:
            raise DataError(f"tokenizer {spec.tokenizer} has no EOS token to end documents with: use a tokenizer "
                            "whose tokenizer_config.json names eos_token")

    def encode_rows(self, rows: list[tuple[object, dict]], skips: SkipCounter, base_dir: Path):
        """(ids, mask, media refs) per usable row; `base_dir`: where relative media paths start."""
        if self.spec.kind == "text":
            yield from self._text(rows, skips)
        else:
            yield from self._conversations(rows, skips, base_dir)

    def _text(self, rows, skips):
        field = self.spec.text_field
        texts = []
        for where, row in rows:
            text = row.get(field)
            if not isinstance(text, str):
                skips.skip("no_text_field", where, f"has no string field {field!r} (data.text_field)")
            elif not text:
                skips.skip("empty_text", where, f"field {field!r} is empty")
            else:
                texts.append(text)
        eos = [self.tokenizer.eos_id]
        for ids in self.tokenizer.encode_batch(texts):
            yield list(ids) + eos, None, None

    def _conversations(self, rows, skips, base_dir: Path):
        from .conversation_media import encode_media_conversation
        from .media import MediaError
        from .chat import ConversationError

        for where, row in rows:
            messages = row.get("messages")
            try:
                ids, mask, media = encode_media_conversation(self.tokenizer, self.template, messages, self.spec.media,
                                                             base_dir, self.spec.train_on)
            except (ConversationError, MediaError) as e:
                skips.skip(e.reason, where, str(e))
                continue
            yield ids, mask, media


_WORKER: dict = {}


def _init_worker(spec: EncodeSpec) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _WORKER["encoder"] = Encoder(spec)


def _encode_unit(args) -> tuple[dict, Counter]:
    unit, folder, name, strict = args
    encoder: Encoder = _WORKER["encoder"]
    skips = SkipCounter(strict)
    writer = ShardWriter(Path(folder), name, with_mask=encoder.spec.kind == "conversations")
    batch, base_dir = [], Path(unit[0]).parent
    for row in iter_unit(unit, skips):
        batch.append(row)
        if len(batch) == _BATCH_ROWS:
            for ids, mask, media in encoder.encode_rows(batch, skips, base_dir):
                writer.add(ids, mask, media)
            batch = []
    for ids, mask, media in encoder.encode_rows(batch, skips, base_dir):
        writer.add(ids, mask, media)
    return writer.close(), skips.counts


def prepare_folder(files: list[Path], out: Path, spec: EncodeSpec, processes: int = 1, strict: bool = False,
                   chunk_bytes: int = 16 << 20) -> dict:
    """Tokenise `files` into the prepared folder `out` (replaced atomically); returns its meta."""
    start = time.perf_counter()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    units = [u for f in files for u in work_units(Path(f), chunk_bytes)]
    jobs = [(u, str(tmp), f"{i:05d}", strict) for i, u in enumerate(units)]
    try:
        if processes <= 1:
            _init_worker(spec)
            results = [_encode_unit(j) for j in jobs]
        else:
            with mp.get_context("spawn").Pool(processes, initializer=_init_worker, initargs=(spec,)) as pool:
                results = pool.map(_encode_unit, jobs, chunksize=1)
        skipped = sum((c for _, c in results), Counter())
        tokenizer = {"path": spec.tokenizer, "vocab_size": load_tokenizer(spec.tokenizer).vocab_size, "spec": asdict(spec),
                     "fingerprint": spec.tokenizer_fingerprint()}
        meta = write_meta(tmp, [r for r, _ in results], spec.kind, tokenizer, skipped, [str(f) for f in files])
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():  # swapped by two renames: a crash leaves the old or the new folder whole
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["seconds"] = time.perf_counter() - start
    log.info("prepared %s: %d documents, %d tokens from %d files in %.1f s (%d processes)%s", out,
             meta["documents"], meta["tokens"], len(files), meta["seconds"], processes,
             f"; skipped {meta['skipped']}" if meta["skipped"] else "")
    return meta
