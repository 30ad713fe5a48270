"""Tokenised corpora on disk: memory-mapped token shards plus a document index.

The way Megatron preprocesses data: the corpus is tokenised once (in parallel processes,
`tools/prepare_data.py`, or on the fly into the cache for small sets) and training reads
the shards lazily through `np.memmap`: a reader holds no tokens, only the document offsets
(8 bytes per document: 4 MB for 2 GB of tokens in 1,000-token documents).

A prepared folder holds `prepared.json` and, per shard NAME:
    NAME.tokens    uint32 token ids of all its documents, back to back
    NAME.docs.npy  int64 [documents + 1] offsets of the documents in NAME.tokens
    NAME.mask      uint8 per token: 1 where the token is a training target (conversations)
    NAME.media.json  (conversations with media) {"docs": {document index in the shard: [media
                   refs]}}: each image, video or clip of a document in placeholder order, with the
                   grid / frames counted from its header (engine/data/conversation_media.py)
Shards are listed in `prepared.json` in corpus order (file, then position in the file), so
the document order does not depend on how many processes wrote them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from .errors import DataError

FORMAT = "omni-engine-token-shards/1"
META = "prepared.json"


class ShardWriter:
    """Appends documents to one shard without holding them in memory."""

    def __init__(self, folder: Path, name: str, with_mask: bool):
        self.folder, self.name = Path(folder), name
        self._tokens = open(self.folder / f"{name}.tokens", "wb")
        self._mask = open(self.folder / f"{name}.mask", "wb") if with_mask else None
        self.offsets = [0]
        self.media: dict[int, list[dict]] = {}

    def add(self, ids, mask=None, media=None) -> None:
        if media:
            self.media[len(self.offsets) - 1] = media
        arr = np.asarray(ids, dtype=np.uint32)
        self._tokens.write(arr.tobytes())
        if self._mask is not None:
            self._mask.write(np.asarray(mask, dtype=np.uint8).tobytes())
        self.offsets.append(self.offsets[-1] + len(arr))

    def close(self) -> dict:
        self._tokens.close()
        if self._mask is not None:
            self._mask.close()
        np.save(self.folder / f"{self.name}.docs.npy", np.asarray(self.offsets, dtype=np.int64))
        if self.media:
            (self.folder / f"{self.name}.media.json").write_text(json.dumps({"docs": self.media}))
        return {"name": self.name, "documents": len(self.offsets) - 1, "tokens": self.offsets[-1],
                "media": sum(len(m) for m in self.media.values())}


def write_meta(folder: Path, shards: list[dict], kind: str, tokenizer: dict, skipped: Counter, sources: list[str]) -> dict:
    meta = {"format": FORMAT, "kind": kind, "tokenizer": tokenizer, "shards": shards,
            "documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
            "skipped": dict(sorted(skipped.items())), "sources": sources}
    tmp = Path(folder) / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, Path(folder) / META)
    return meta


def is_prepared(path: Path) -> bool:
    return (Path(path) / META).is_file()


class ConcatArray:
    """Several 1-D memmaps read as one: slices that cross shard ends are stitched."""

    ndim = 1

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = parts[0].dtype if parts else np.dtype(np.uint32)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            assert step == 1
            out, pos = [], start
            while pos < stop:
                k = int(np.searchsorted(self.starts, pos, side="right")) - 1
                end = min(stop, int(self.starts[k + 1]))
                out.append(self.parts[k][pos - self.starts[k]:end - self.starts[k]])
                pos = end
            return np.concatenate(out) if out else np.zeros(0, self.dtype)
        k = int(np.searchsorted(self.starts, key, side="right")) - 1
        return self.parts[k][key - self.starts[k]]


class TokenShards:
    """A prepared folder, read lazily: `tokens`, `mask` (or None), `doc_offsets` [docs + 1]."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / META).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{self.folder / META} is unreadable ({e}); prepare the folder again with "
                            "tools/prepare_data.py") from None
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{self.folder} holds format {self.meta.get('format')!r}, not {FORMAT}; prepare it again "
                            "with tools/prepare_data.py")
        tokens, masks, offsets, base = [], [], [np.zeros(1, np.int64)], 0
        self._media: dict[int, list[dict]] = {}
        for shard in self.meta["shards"]:
            name = shard["name"]
            try:
                docs = np.load(self.folder / f"{name}.docs.npy")
                toks = np.memmap(self.folder / f"{name}.tokens", dtype=np.uint32, mode="r") \
                    if docs[-1] else np.zeros(0, np.uint32)
                mask = np.memmap(self.folder / f"{name}.mask", dtype=np.uint8, mode="r") \
                    if self.kind == "conversations" and docs[-1] else None
            except (OSError, ValueError) as e:
                raise DataError(f"shard {name} of {self.folder} is unreadable ({e}); prepare the folder again") from None
            if len(toks) != docs[-1] or (mask is not None and len(mask) != docs[-1]):
                raise DataError(f"shard {name} of {self.folder} is truncated ({len(toks)} of {docs[-1]} tokens); "
                                "prepare the folder again")
            if shard.get("media"):
                try:
                    docs_media = json.loads((self.folder / f"{name}.media.json").read_text())["docs"]
                except (OSError, ValueError, KeyError) as e:
                    raise DataError(f"shard {name} of {self.folder} has unreadable media refs ({e}); prepare the "
                                    "folder again") from None
                first = sum(len(o) for o in offsets) - 1
                self._media.update({first + int(k): v for k, v in docs_media.items()})
            tokens.append(toks)
            if mask is not None:
                masks.append(mask)
            offsets.append(docs[1:] + base)
            base += int(docs[-1])
        self.tokens = ConcatArray(tokens)
        self.mask = ConcatArray(masks) if self.kind == "conversations" else None
        self.doc_offsets = np.concatenate(offsets)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def skipped(self) -> dict[str, int]:
        return self.meta.get("skipped", {})

    def __len__(self) -> int:
        return len(self.doc_offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)

    @property
    def has_media(self) -> bool:
        return bool(self._media)

    def media(self, i: int) -> list[dict]:
        """The media refs of document i (empty for text-only documents)."""
        return self._media.get(int(i), [])

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        lo, hi = int(self.doc_offsets[i]), int(self.doc_offsets[i + 1])
        ids = np.asarray(self.tokens[lo:hi], dtype=np.int64)
        return ids, (np.asarray(self.mask[lo:hi], dtype=bool) if self.mask is not None else None)
