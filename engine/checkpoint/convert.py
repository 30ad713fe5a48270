"""Streaming conversion between Hugging Face folders and our checkpoints.

- `import_hf(hf_dir, out_dir)`: a Hugging Face folder -> an imported folder (our names,
  `weights*.safetensors`, one output file per input shard, plus `config.yaml` whose
  `model.init_from` points at it, the original `config.json` as `hf_config.json`, and the
  tokenizer files). Train from it with `--config OUT/config.yaml` or `--model.init_from=OUT`.
- `export_hf(src, out_dir)`: a training checkpoint (`.../checkpoints/step_XXXXXXXX`, sharded
  DCP, read without a process group), an imported folder or a Hugging Face folder -> a
  Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

Both read and write one tensor (export from DCP: one output shard) at a time, so the peak
memory is about one shard, whatever the model size.

Qwen3-MoE experts: import stacks Hugging Face's per-expert tensors into our fused
`experts.gate_up_proj` / `experts.down_proj` (one expert at a time, into the output
tensor); export splits them back into `experts.{e}.gate_proj/up_proj/down_proj.weight`,
which is what transformers' `save_pretrained` writes and `from_pretrained` reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from engine.data.tokenizer import cached_tokenizer_path
from engine.config import Config, expand_path, load_config

from .hf import (HFCheckpointError, KeyMismatchError, ShapeMismatchError, TensorReader, WeightFolder,
                 check_config_matches, expected_shapes, hf_architecture, hf_config_from_model, is_fused_expert,
                 ours_to_hf, per_expert_names)
from .safetensors_io import TensorSpec, shard_groups, shard_names, write_index, write_safetensors

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# ---- import ----------------------------------------------------------------------------
def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Hugging Face folder -> imported folder; tensors are copied bitwise, one at a time."""
    folder = WeightFolder(hf_dir)
    if folder.format != "hf":
        raise HFCheckpointError(f"{hf_dir} is already an imported folder: train from it directly "
                                "(--model.init_from) or export it")
    cfg = folder.model_config()
    entries = folder.plan(expected_shapes(cfg), tied=cfg.tie_embeddings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_file = [[e for e in entries if e.file == f] for f in folder.files]
    by_file = [g for g in by_file if g]
    names = shard_names("weights", len(by_file))
    groups = []
    reader = TensorReader()
    for name, group in zip(names, by_file):
        specs = [dataclasses.replace(e.spec, name=e.name) for e in group]
        entry = {e.name: e for e in group}
        write_safetensors(out / name, specs, lambda n: reader.read(entry[n]), {"format": "pt"})
        reader.close()
        groups.append(specs)
    if len(names) > 1:
        write_index(out, "weights", names, groups)
    shutil.copyfile(folder.path / "config.json", out / "hf_config.json")
    for extra in (*TOKENIZER_FILES, "generation_config.json"):
        if (folder.path / extra).is_file():
            shutil.copyfile(folder.path / extra, out / extra)
    model = {**dataclasses.asdict(cfg), "init_from": str(out.resolve())}
    (out / "config.yaml").write_text(
        f"# Imported from {folder.path.resolve()} by tools/convert_hf_checkpoint.py import.\n"
        "# Train from these weights: pretrain_omni.py --config THIS_FILE (add data/train sections or overrides).\n"
        + yaml.safe_dump({"model": model}, sort_keys=False))
    log.info("imported %d tensors from %s into %s (%d file(s))", len(entries), folder.path, out, len(names))
    return out


# ---- sources for export ----------------------------------------------------------------
class DCPSource:
    """The model part (`model.` keys) of a DCP checkpoint, read without a process group."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        try:
            self.metadata = FileSystemReader(str(path)).read_metadata()
        except Exception as e:
            raise HFCheckpointError(f"{path} is not a readable DCP checkpoint ({type(e).__name__}): pass a "
                                    "checkpoints/step_XXXXXXXX directory written by training") from None
        self.specs = {k[len("model."):]: TensorSpec(k[len("model."):], v.properties.dtype, tuple(v.size))
                      for k, v in self.metadata.state_dict_metadata.items()
                      if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}

    def _load(self, state: dict) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore")
            dcp.load(state, storage_reader=FileSystemReader(str(self.path)), no_dist=True)
        return state

    def saved_config(self) -> Optional[Config]:
        if "trainer.config" not in self.metadata.state_dict_metadata:
            return None
        text = self._load({"trainer": {"config": ""}})["trainer"]["config"]
        tree = json.loads(text)
        cfg = Config()
        for section, values in tree.items():
            if hasattr(cfg, section):
                fields = {f.name for f in dataclasses.fields(getattr(cfg, section))}
                for k, v in values.items():
                    if k in fields:
                        setattr(getattr(cfg, section), k, v)
        return cfg

    def read_group(self, names: list[str], chunk_bytes: int = 128 * 10**6) -> Callable[[str], torch.Tensor]:
        """A getter for these tensors, to be called in order; each DCP read fetches the next few tensors
        (up to `chunk_bytes`, or one larger tensor), so memory stays near one tensor, not one shard."""
        loaded: dict[str, torch.Tensor] = {}

        def get(name: str) -> torch.Tensor:
            if name not in loaded:
                start, chunk, size = names.index(name), [], 0
                for n in names[start:]:
                    if chunk and size + self.specs[n].nbytes > chunk_bytes:
                        break
                    chunk.append(n)
                    size += self.specs[n].nbytes
                state = {"model": {n: torch.empty(self.specs[n].shape, dtype=self.specs[n].dtype) for n in chunk}}
                loaded.update(self._load(state)["model"])
            return loaded.pop(name)
        return get


class FolderSource:
    def __init__(self, folder: WeightFolder):
        self.folder, self.path = folder, folder.path
        self.specs = {e.name: dataclasses.replace(e.spec, name=e.name) for e in folder.entries}
        self._entries = {e.name: e for e in folder.entries}

    def read_group(self, names: list[str]) -> Callable[[str], torch.Tensor]:
        reader = TensorReader()

        def get(name: str) -> torch.Tensor:
            t = reader.read(self._entries[name])
            reader.close()
            return t
        return get


def hf_specs(expected: dict[str, tuple], dtypes: dict[str, torch.dtype], split_experts: bool):
    """The Hugging Face tensors of an export, in model order, and for each the (our tensor, index)
    it comes from: index None = the whole tensor; (expert, row slice) = one expert's piece of a
    fused expert tensor, written per expert as transformers does."""
    specs, pieces = [], {}
    for n, shape in expected.items():
        if not (split_experts and is_fused_expert(n)):
            specs.append(TensorSpec(ours_to_hf(n), dtypes[n], tuple(shape)))
            pieces[specs[-1].name] = (n, None)
            continue
        experts, rows, cols = shape
        names = per_expert_names(n, experts)
        per = len(names) // experts  # 2 for gate_up_proj (gate rows, then up rows), 1 for down_proj
        for i, hf_name in enumerate(names):
            e, j = divmod(i, per)
            specs.append(TensorSpec(hf_name, dtypes[n], (rows // per, cols)))
            pieces[hf_name] = (n, (e, slice(j * rows // per, (j + 1) * rows // per)))
    return specs, pieces


def _piece_getter(get: Callable[[str], torch.Tensor], pieces: dict, group: list[TensorSpec]):
    """`get` reads each source tensor once, in order; the pieces of a fused one come from one read."""
    held: dict[str, torch.Tensor] = {}
    out_of = {s.name: s.dtype for s in group}

    def piece(hf_name: str) -> torch.Tensor:
        src, index = pieces[hf_name]
        if src not in held:
            held.clear()  # the previous source is done: tensors are written in source order
            held[src] = get(src)
        t = held[src] if index is None else held[src][index[0], index[1]]
        return t.to(out_of[hf_name]).contiguous()
    return piece


def _check(specs: dict[str, TensorSpec], expected: dict[str, tuple], where: Path, tied: bool) -> None:
    present = {n for n in specs if not (tied and n == "lm_head.weight")}
    if present - set(expected):
        extra = sorted(present - set(expected))
        raise KeyMismatchError(f"{where} has {len(extra)} unexpected tensor(s) ('{extra[0]}', ...) that the model "
                               "config does not have: pass the --config the checkpoint was trained with")
    missing = [n for n in expected if n not in present]
    if missing:
        raise KeyMismatchError(f"{where} lacks {len(missing)} tensor(s) the model needs ('{missing[0]}', ...): pass "
                               "the --config the checkpoint was trained with, or a complete checkpoint")
    for n, shape in expected.items():
        if specs[n].shape != tuple(shape):
            raise ShapeMismatchError(f"tensor '{n}' in {where} has shape {specs[n].shape} but the model config expects "
                                     f"{tuple(shape)}: pass the --config the checkpoint was trained with")


# ---- tokenizer files -------------------------------------------------------------------
def _write_sentencepiece(model_file: Path, out: Path, max_len: int) -> dict:
    """Copy a sentencepiece model as `tokenizer.model` with a LlamaTokenizer config; returns token ids."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    shutil.copyfile(model_file, out / "tokenizer.model")
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
              "legacy": False, "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    config.update({f"{k}_token": sp.id_to_piece(i) for k, i in ids.items() if i >= 0})
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {f"{k}_token_id": i for k, i in ids.items() if i >= 0 and k != "unk"}


def _write_tokenizer(tokenizer: Optional[Path], out: Path, max_len: int) -> dict:
    if tokenizer is None:
        log.warning("no tokenizer found for the export: pass --tokenizer (a .model, tokenizer.json or a folder)")
        return {}
    if tokenizer.is_file() and tokenizer.suffix == ".model":
        return _write_sentencepiece(tokenizer, out, max_len)
    if tokenizer.is_file() and tokenizer.name.endswith(".json"):
        shutil.copyfile(tokenizer, out / "tokenizer.json")
        src_dir = tokenizer.parent
    elif tokenizer.is_dir():
        src_dir = tokenizer
    else:
        raise HFCheckpointError(f"tokenizer {tokenizer} is not a .model, a tokenizer.json or a folder: pass one of them")
    copied = [f for f in TOKENIZER_FILES if (src_dir / f).is_file() and not (out / f).exists()]
    for f in copied:
        shutil.copyfile(src_dir / f, out / f)
    if not (out / "tokenizer.json").exists() and not (out / "tokenizer.model").exists():
        models = sorted(src_dir.glob("*.model"))
        if models:
            return _write_sentencepiece(models[0], out, max_len)
        raise HFCheckpointError(f"{tokenizer} holds no tokenizer.json or tokenizer.model: pass the tokenizer file")
    if not (out / "tokenizer_config.json").exists():
        (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")
    return {}


# ---- export ----------------------------------------------------------------------------
def export_hf(src: str | Path, out_dir: str | Path, config: Optional[str] = None, max_shard_size: int = 5 * 10**9,
              dtype: str = "auto", tokenizer: Optional[str | Path] = None) -> Path:
    """Training checkpoint, imported folder or HF folder -> Hugging Face folder, one shard in memory at a time."""
    src = Path(src)
    if dtype not in DTYPES:
        raise HFCheckpointError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    run_cfg: Optional[Config] = load_config(config) if config else None
    release = _vision_language_release(src, run_cfg)
    if release is not None:  # a whole released multimodal model: its own adapter and files
        from . import janus, qwen2_vl

        if janus.is_janus(release):
            return janus.export(src, Path(out_dir), release, max_shard_size, DTYPES[dtype])

        return qwen2_vl.export(src, Path(out_dir), release, max_shard_size, DTYPES[dtype])
    template, token_ids, tok_path = None, {}, Path(tokenizer) if tokenizer else None
    if (src / ".metadata").is_file():
        source = DCPSource(src)
        saved = source.saved_config()
        full = run_cfg or saved
        if full is None:
            raise HFCheckpointError(f"{src} carries no training config: pass --config CONFIG.yaml (the one it was "
                                    "trained with)")
        cfg = full.model
        if run_cfg is not None and saved is not None:
            check_config_matches(saved.model, cfg, f"checkpoint {src} was trained with", "--config")
        if tok_path is None:
            cached = cached_tokenizer_path(expand_path(full.data.cache_dir), full.data.tokenizer, cfg.vocab_size)
            tok_path = cached if cached.is_file() else None
    else:
        folder = WeightFolder(src)
        source = FolderSource(folder)
        cfg = run_cfg.model if run_cfg else folder.model_config()
        for name in ("hf_config.json", "config.json"):
            if (src / name).is_file():
                template = json.loads((src / name).read_text())
                break
        if tok_path is None and any((src / f).is_file() for f in TOKENIZER_FILES):
            tok_path = src
    expected = expected_shapes(cfg)
    _check(source.specs, expected, src, cfg.tie_embeddings)

    out_dtype = DTYPES[dtype]
    specs, pieces = hf_specs(expected, {n: out_dtype or source.specs[n].dtype for n in expected},
                             split_experts=hf_architecture(cfg) == "Qwen3MoeForCausalLM")
    groups = shard_groups(specs, max_shard_size)
    names = shard_names("model", len(groups))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors", out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # an earlier export's files would mix with this one's
    for name, group in zip(names, groups):
        sources = list(dict.fromkeys(pieces[s.name][0] for s in group))  # in order, each once
        write_safetensors(out / name, group, _piece_getter(source.read_group(sources), pieces, group),
                          {"format": "pt"})
    if len(names) > 1:
        write_index(out, "model", names, groups)

    token_ids.update(_write_tokenizer(tok_path, out, cfg.max_position_embeddings))
    weight_dtype = out_dtype or specs[0].dtype
    hf_cfg = hf_config_from_model(cfg, weight_dtype, template, token_ids)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
    elif token_ids:
        gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if hf_cfg.get(k) is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    log.info("exported %d tensors from %s to %s (%s, %d file(s))", len(specs), src, out, hf_cfg["architectures"][0],
             len(names))
    return out


def _vision_language_release(src: Path, run_cfg: Optional[Config]) -> Optional[Path]:
    """The released Qwen2-VL / Qwen2.5-VL / Qwen2.5-Omni folder behind `src`: src itself, or the
    `model.init_from` of the run that wrote the checkpoint (from --config, else the config
    saved in it)."""
    from . import janus, qwen2_vl

    def whole(folder: Path) -> bool:
        return bool(qwen2_vl.family_of(folder)) or janus.is_janus(folder)

    if whole(src):
        return src
    if not (src / ".metadata").is_file():
        return None
    cfg = run_cfg or DCPSource(src).saved_config()
    init_from = cfg.model.init_from if cfg is not None else None
    if init_from and whole(expand_path(init_from)):
        return expand_path(init_from)
    return None
