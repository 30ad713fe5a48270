"""Bad config input never ends in a traceback: `python pretrain_omni.py` prints one line naming
the key and exits 2, whatever the YAML or the command line holds.

(a) known mistakes that only show when the config meets the machine or the build (CUDA asked
    for on a CPU machine, flash-attn, nccl, unknown or mis-sized parts, NaN learning rate,
    directories that are files) and the static table of tests/test_config.py, run through
    pretrain_omni.main in this process;
(b) a seeded fuzzer: random mutations of tiny_dense.yaml / tiny_omni.yaml (wrong types,
    negative, NaN, huge values, empty strings, unknown keys, random enum strings, broken part
    specs), each run through loading, validation and the whole build up to the training loop
    (Trainer.fit is replaced by a no-op). Each must either build or exit 2 with one line.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import random
import string
import typing
from pathlib import Path

import pytest
import torch
import yaml

import pretrain_omni
from engine.config import Config
from engine.training.trainer import Trainer
from test_config import BAD

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
TINY = str(CONFIGS / "tiny_dense.yaml")
OMNI = str(CONFIGS / "tiny_omni.yaml")


@pytest.fixture
def build_only(monkeypatch, tmp_path):
    """Runs pretrain_omni.main up to (not into) the training loop, with outputs in tmp_path;
    undoes the global switches a config may flip (deterministic algorithms)."""
    monkeypatch.setattr(Trainer, "fit", lambda self: [])
    (tmp_path / "a_file").write_text("not a directory\n")
    yield tmp_path
    torch.use_deterministic_algorithms(False)


def run_main(config: str, argv: list[str], tmp_path: Path | None) -> tuple[int, str]:
    """(exit code, stderr) of pretrain_omni.main; any exception escapes (= a traceback).
    With tmp_path, outputs go there (before argv, so that argv can still set them)."""
    base = ["--config", config]
    if tmp_path is not None:
        base += [f"--train.output_dir={tmp_path / 'out'}", "--train.progress_bar=false", "--checkpoint.resume=none"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = pretrain_omni.main(base + argv)
    return rc, err.getvalue()


def assert_one_line_error(rc: int, stderr: str, words: list[str]) -> None:
    lines = stderr.strip().splitlines()
    assert rc == 2, f"exit code {rc}, stderr: {stderr!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one 'error:' line: {stderr!r}"
    for word in words:
        assert word in lines[0], f"{word!r} missing from: {lines[0]}"


# ---- (a) known cases -----------------------------------------------------------------------
def _flash_attn_usable() -> bool:
    from engine.ops.attention import flash_attn_available
    return flash_attn_available()


NO_PROC = None if Path("/proc/self").is_dir() else "no /proc file system here"
MACHINE = [
    # (config, argv, words the one-line message must contain, skip reason or None)
    (TINY, ["--train.device=cuda"], ["train.device", "cuda", "--train.device=cpu"],
     "CUDA is available" if torch.cuda.is_available() else None),
    (TINY, ["--model.attention_backend=flash_attn"], ["model.attention_backend", "flash_attn", "sdpa"],
     "flash-attn is usable here" if _flash_attn_usable() else None),
    (TINY, ["--parallel.backend=nccl", "--train.device=cpu"], ["parallel.backend", "nccl", "gloo"], None),
    (TINY, ["--parallel.backend=fake", "--parallel.fake_rank=3"], ["parallel.fake_rank", "3"], None),
    (TINY, ["--model.encoders=[{name: nope}]"], ["model.encoders[0].name", "nope", "vision"], None),
    (OMNI, ["--model.encoders=[{name: nope}]"], ["model.encoders[0].name", "nope", "vision"], None),
    (OMNI, ["--model.decoders=[{name: nope}]"], ["model.decoders[0].name", "nope", "image_vq"], None),
    (OMNI, ["--model.plugins=no_such_plugin_module"], ["model.plugins", "no_such_plugin_module"], None),
    (OMNI, ["--model.encoders=[{name: vision, depth: -1}]"], ["model.encoders[0].depth", "-1"], None),
    (OMNI, ["--model.encoders=[{name: vision, patch_size: 0}]"], ["model.encoders[0].patch_size", "0"], None),
    (OMNI, ["--model.encoders=[{name: vision, num_heads: 0}]"], ["model.encoders[0].num_heads", "0"], None),
    (OMNI, ["--model.encoders=[{name: vision, depth: two}]"], ["model.encoders[0].depth", "int", "two"], None),
    (OMNI, ["--model.encoders=[{name: audio, d_model: -32}]"], ["model.encoders[0].d_model", "-32"], None),
    (OMNI, ["--model.encoders=[{name: audio, encoder_attention_heads: 0}]"],
     ["model.encoders[0].encoder_attention_heads", "0"], None),
    (OMNI, ["--model.decoders=[{name: image_vq, num_embeddings: 0}]"],
     ["model.decoders[0].num_embeddings", "0"], None),
    (TINY, ["--train.lr=nan"], ["train.lr", "nan"], None),
    (TINY, ["--train.lr=inf"], ["train.lr", "inf"], None),
    (TINY, ["--train.lr=-1"], ["train.lr", "-1"], None),
    (TINY, ["--train.beta2=1.5"], ["train.beta2", "1.5"], None),
    (TINY, ["--train.seed=-1"], ["train.seed", "-1"], None),
    (TINY, ["--data.cache_dir={tmp}/a_file"], ["data.cache_dir", "a_file", "not a directory"], None),
    (TINY, ["--data.cache_dir={tmp}/a_file/sub"], ["data.cache_dir", "a_file/sub"], None),
    (TINY, ["--train.output_dir={tmp}/a_file"], ["train.output_dir", "a_file", "not a directory"], None),
    (TINY, ["--train.output_dir={tmp}/a_file/sub"], ["train.output_dir", "a_file/sub"], None),
    (TINY, ["--train.output_dir="], ["train.output_dir", "empty"], None),
    # exist nowhere yet and cannot be made (/proc takes no new folders; root ignores permissions)
    (TINY, ["--train.output_dir=/proc/omni_engine_fuzz/run"], ["train.output_dir", "cannot create"], NO_PROC),
    (TINY, ["--data.cache_dir=/proc/omni_engine_fuzz/cache"], ["data.cache_dir", "cannot create"], NO_PROC),
]


@pytest.mark.parametrize("config,argv,words,skip", MACHINE,
                         ids=[f"{Path(c).stem}:{' '.join(a)}" for c, a, _, _ in MACHINE])
def test_known_bad_input_exits_2_with_one_line(config, argv, words, skip, build_only):
    if skip:
        pytest.skip(skip)
    argv = [a.replace("{tmp}", str(build_only)) for a in argv]
    rc, stderr = run_main(config, argv, build_only)
    assert_one_line_error(rc, stderr, words)


STATIC = [(argv, words) for argv, world, words in BAD if world == 1]


@pytest.mark.parametrize("argv,words", STATIC, ids=[" ".join(a) for a, _ in STATIC])
def test_static_table_through_main(argv, words, build_only):
    """tests/test_config.py's table of static mistakes, end to end: exit 2, one line."""
    if argv[0] == "--config":
        rc, stderr = run_main(argv[1], argv[2:], None)
    else:
        rc, stderr = run_main(TINY, argv, build_only)
    assert_one_line_error(rc, stderr, words)


# ---- (b) the fuzzer -------------------------------------------------------------------------
SEED = 16
COUNT = 96  # mutations; each is its own test case, named after what it changes. The list is a
# function of the seed and of the config's keys (read from engine/config.py): a new key joins in.


def _fields() -> dict[str, typing.Any]:
    """'section.key' -> its type annotation, for every key of the config."""
    out = {}
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        for name, annotation in typing.get_type_hints(cls).items():
            out[f"{section.name}.{name}"] = annotation
    return out


# Keys naming files or folders: the fuzzer only gives them values that must fail (or harmless
# ones inside the test's folder), never a fresh relative folder in the repository.
PATH_VALUES = ["", "{tmp}/a_file", "{tmp}/a_file/below", "/proc/no/such", "{tmp}/missing_dir/x.model", 7, [1, 2],
               {"a": 1}]
PATH_KEYS = {"data.cache_dir", "train.output_dir", "checkpoint.resume", "data.tokenizer", "data.path",
             "data.eval_path", "data.chat_template", "model.init_from", "model.plugins", "data.plugins"}
# A fresh cache folder would rebuild the corpus and tokenizer (many seconds): only broken ones.
DIR_VALUES = ["", " ", "{tmp}/a_file", "{tmp}/a_file/below", "/proc/no/such", [1, 2], {"a": 1}, None]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase + "_") for _ in range(rng.randint(1, 8)))


def _bad_value(rng: random.Random, annotation) -> typing.Any:
    args = typing.get_args(annotation)
    if type(None) in args:  # Optional[X]
        annotation = next(a for a in args if a is not type(None))
    if rng.random() < 0.25:  # the wrong type altogether
        return rng.choice([_word(rng), "", [1, "x"], {"k": 1}, None])
    if annotation is bool:
        return rng.choice(["maybe", 2, -1, 0.5])
    if annotation is int:
        return rng.choice([-1, -7, 0, 2 ** 40, 10 ** 30, 2.5, float("nan"), float("inf"), True])
    if annotation is float:
        return rng.choice([-1.0, -1e-3, 0.0, float("nan"), float("inf"), float("-inf"), 1e30, 1e308, 10 ** 30])
    if annotation is str:
        return rng.choice([_word(rng), _word(rng).upper(), 5, 1.5, ""])
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        return rng.choice([[_bad_value(rng, item)], _bad_value(rng, item), [], "a,,b"])
    if annotation is dict:
        return rng.choice([{"type": _word(rng)}, {"type": "linear", "factor": float("nan")},
                           {"type": "linear", "factor": -2}, {"type": "llama3", "factor": 8.0}, "linear"])
    return None


PART_RESERVED = {"freeze": ["maybe", 3, None], "loss_weight": [float("nan"), -1.0, "heavy", float("inf"), []],
                 "recipe": ["zero3", 1, ""], "init_from": ["{tmp}/a_file", "/no/such/part", 3],
                 "placeholder": [-5, 10 ** 9, "x", 1.5], "project": ["sure", 2],
                 "activation_checkpointing": ["x", 4]}


def _mutate_part(rng: random.Random, tree: dict) -> str:
    """Break one encoder/decoder spec of tiny_omni.yaml in place; returns what it did."""
    kind = rng.choice(["encoders", "decoders"])
    specs = tree["model"][kind]
    i = rng.randrange(len(specs))
    spec = specs[i]
    choice = rng.randrange(9)
    if choice == 0:
        specs[i] = rng.choice(["vision", 5, None, [], [spec]])
        return f"{kind}[{i}]={specs[i]!r}"
    if choice == 1:
        del spec["name"]
        return f"{kind}[{i}] without name"
    if choice == 2:
        spec["name"] = rng.choice([_word(rng), 3, None, ""])
        return f"{kind}[{i}].name={spec['name']!r}"
    if choice == 3:
        key = _word(rng)
        spec[key] = 1
        return f"{kind}[{i}].{key}=1 (unknown)"
    if choice == 4:
        key, values = rng.choice(sorted(PART_RESERVED.items()))
        spec[key] = rng.choice(values)
        return f"{kind}[{i}].{key}={spec[key]!r}"
    if choice == 5:
        specs.append(copy.deepcopy(spec))
        return f"{kind}[{i}] twice"
    if choice == 6:
        tree["model"][kind] = rng.choice([spec, "vision", 3])
        return f"{kind}={tree['model'][kind]!r}"
    key = rng.choice(sorted(k for k in spec if k != "name" and not isinstance(spec[k], bool)))
    spec[key] = _bad_value(rng, int) if choice == 7 else rng.choice([0, -1, 2 ** 40, 10 ** 30, 1.5, "big"])
    return f"{kind}[{i}].{key}={spec[key]!r}"


def mutations(seed: int = SEED, count: int = COUNT) -> list[tuple[str, str, dict, list[str]]]:
    """[(id, base config, the mutated YAML tree, extra CLI arguments)], the same every run."""
    rng = random.Random(seed)
    fields = _fields()
    keys = sorted(fields)
    bases = {TINY: yaml.safe_load(Path(TINY).read_text()), OMNI: yaml.safe_load(Path(OMNI).read_text())}
    out = []
    for n in range(count):
        base = TINY if n % 2 == 0 else OMNI
        tree = copy.deepcopy(bases[base])
        tree["train"].update(output_dir="{tmp}/out", progress_bar=False)
        tree["checkpoint"]["resume"] = "none"
        argv: list[str] = []
        kind = rng.randrange(10)
        if kind <= 4:  # a known key gets a bad value, in the YAML or on the command line
            key = rng.choice(keys)
            if key in ("data.cache_dir", "train.output_dir"):
                value = rng.choice(DIR_VALUES)
            else:
                value = rng.choice(PATH_VALUES) if key in PATH_KEYS else _bad_value(rng, fields[key])
            section, name = key.split(".")
            if rng.random() < 0.5 and not isinstance(value, (dict, list)):
                argv.append(f"--{key}={value}" if value is not None else f"--{key}=null")
                what = f"--{key}={value!r}"
            else:
                tree.setdefault(section, {})[name] = value
                what = f"{key}: {value!r}"
        elif kind == 5:  # an unknown key or section
            key = rng.choice([f"{rng.choice(list(fields)).split('.')[0]}.{_word(rng)}", f"{_word(rng)}.steps",
                              rng.choice(keys) + "s"])
            argv.append(f"--{key}=1")
            what = f"unknown --{key}"
        elif kind == 6:  # a section that is not a mapping, or a YAML that is not one
            section = rng.choice(["model", "train", "data", "parallel", "checkpoint"])
            tree[section] = rng.choice([[1, 2], "x", 3, None])
            what = f"section {section}: {tree[section]!r}"
        elif base == OMNI:  # a broken part spec
            what = _mutate_part(rng, tree)
        else:  # two keys at once
            parts = []
            for key in rng.sample([k for k in keys if k not in PATH_KEYS], 2):
                value = _bad_value(rng, fields[key])
                tree.setdefault(key.split(".")[0], {})[key.split(".")[1]] = value
                parts.append(f"{key}: {value!r}")
            what = ", ".join(parts)
        out.append((f"{n:02d}-{Path(base).stem}-{what}"[:120], base, tree, argv))
    return out


MUTATIONS = mutations()


@pytest.mark.timeout(120)  # a hang is a finding too
@pytest.mark.parametrize("tree,argv", [m[2:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_fuzzed_config_builds_or_exits_2_with_one_line(tree, argv, build_only):
    tmp = str(build_only)
    text = yaml.safe_dump(tree).replace("{tmp}", tmp)
    path = build_only / "fuzzed.yaml"
    path.write_text(text)
    argv = [a.replace("{tmp}", tmp) for a in argv]
    rc, stderr = run_main(str(path), argv, None)
    if rc == 0:
        return
    lines = stderr.strip().splitlines()
    assert rc == 2, f"exit code {rc}: {stderr!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one 'error:' line: {stderr!r}"
