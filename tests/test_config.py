"""Config loading: YAML + overrides, and a table of user mistakes that must fail clearly."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.config import ConfigError, load_config, parse_overrides, resolve_layout

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples/configs/tiny_dense.yaml")


def load(argv, world_size=1):
    path, overrides = parse_overrides(argv)
    cfg = load_config(path, overrides)
    return cfg, resolve_layout(cfg, world_size)


def test_yaml_then_overrides_win():
    cfg, _ = load(["--config", TINY, "--train.lr=1e-3", "--train.steps", "7", "--parallel.sp_async=true",
                   "--model.head_dim=null", "--train.dtype=bf16"])
    assert cfg.model.hidden_size == 64  # from the YAML
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)  # "1e-3" is a str to YAML 1.1
    assert cfg.train.steps == 7 and cfg.parallel.sp_async is True and cfg.model.head_dim is None
    assert cfg.train.dtype == "bf16"


def test_public_keys_exist():
    cfg = load_config()
    for key in ["data.seq_len", "data.global_batch_size", "train.steps", "train.seed", "train.lr", "train.dtype",
                "train.output_dir", "parallel.dp_replicate", "parallel.dp_shard", "parallel.sp_size",
                "parallel.sp_async", "parallel.ep_size", "checkpoint.interval", "checkpoint.resume"]:
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key


def test_layout_fill_and_accumulation():
    _, lay = load(["--config", TINY, "--parallel.dp_replicate=2", "--data.micro_batch_size=1"], world_size=4)
    assert lay["dp_shard"] == 2 and lay["dp"] == 4 and lay["local_batch"] == 2 and lay["grad_accum"] == 2


BAD = [
    # (argv, world size, words the one-line message must contain)
    (["--train.lrr=0.1"], 1, ["train.lrr", "train.lr"]),
    (["--trian.steps=3"], 1, ["trian.steps", "train.steps"]),
    (["--train.steps=ten"], 1, ["train.steps", "int", "ten"]),
    (["--train.lr=fast"], 1, ["train.lr", "float", "fast"]),
    (["--data.num_workers=-1"], 1, ["data.num_workers", ">= 0", "-1"]),
    (["--data.min_pixels=1000", "--data.max_pixels=100"], 1, ["data.min_pixels", "data.max_pixels", "1000"]),
    (["--data.video_fps=0"], 1, ["data.video_fps", "> 0"]),
    (["--parallel.sp_async=maybe"], 1, ["parallel.sp_async", "bool"]),
    (["--train.dtype=fp16"], 1, ["train.dtype", "fp32", "bf16", "fp16"]),
    (["--data.seq_len=0"], 1, ["data.seq_len", ">= 1"]),
    (["--model.num_kv_heads=3"], 1, ["model.num_kv_heads", "num_heads"]),
    (["--model.hidden_size=250"], 1, ["model.hidden_size", "num_heads"]),
    (["--parallel.dp_shard=3"], 4, ["dp_shard(3)", "world size is 4"]),
    (["--parallel.dp_replicate=3"], 4, ["world size 4", "dp_replicate"]),
    (["--data.global_batch_size=6"], 4, ["data.global_batch_size", "6", "4"]),
    (["--data.micro_batch_size=3"], 2, ["data.micro_batch_size", "3"]),
    (["--checkpoint.resume=/no/such/dir"], 1, ["checkpoint.resume", "/no/such/dir"]),
    (["--parallel.backend=mpi"], 1, ["parallel.backend", "mpi", "gloo"]),
    (["--train.warmup_steps=-1"], 1, ["train.warmup_steps"]),
    (["--config", "/no/such.yaml"], 1, ["/no/such.yaml", "does not exist"]),
    (["--train.lr"], 1, ["--train.lr", "VALUE"]),
    (["stray"], 1, ["stray", "--section.key=value"]),
    (["--model.rope_scaling=3"], 1, ["model.rope_scaling", "dict"]),
    # numbers torch or numpy would reject late (or never): NaN, inf, out-of-range, absurd sizes
    (["--train.lr=nan"], 1, ["train.lr", "finite", "nan"]),
    (["--train.lr=inf"], 1, ["train.lr", "finite", "inf"]),
    (["--train.weight_decay=-.inf"], 1, ["train.weight_decay", "finite"]),
    (["--train.beta2=1.0"], 1, ["train.beta2", "[0, 1)", "1.0"]),
    (["--train.seed=-1"], 1, ["train.seed", "-1"]),
    (["--model.rope_theta=0"], 1, ["model.rope_theta", "> 0"]),
    (["--model.head_dim=-2"], 1, ["model.head_dim", "-2"]),
    (["--train.steps=1e30"], 1, ["train.steps", "int"]),
    (["--train.steps=1000000000000000000000000000000"], 1, ["train.steps", "64-bit"]),
    (["--model.num_layers=100000000"], 1, ["model.num_layers", "4096"]),
    (["--model.hidden_size=1099511627776"], 1, ["model.hidden_size", "parameters"]),
    (["--data.num_workers=100000"], 1, ["data.num_workers", "100000"]),
    (["--data.global_batch_size=1099511627776"], 1, ["data.global_batch_size", "tokens per step"]),
    # folders that are files, or empty
    (["--train.output_dir="], 1, ["train.output_dir", "empty"]),
    (["--data.cache_dir=/dev/null"], 1, ["data.cache_dir", "/dev/null", "not a directory"]),
    (["--train.output_dir=/dev/null/run"], 1, ["train.output_dir", "/dev/null", "not a directory"]),
    # the engine's own keys of part specs (the parts' options are checked where they are built)
    (["--model.encoders=[{depth: 2}]"], 1, ["model.encoders[0]", "name"]),
    (["--model.encoders=[{name: vision}, {name: vision}]"], 1, ["model.encoders[1]", "vision", "once"]),
    (["--model.decoders=[{name: image_vq, recipe: replicate}]"], 1, ["model.decoders[0].recipe", "fsdp"]),
    (["--model.decoders=[{name: image_vq, loss_weight: .nan}]"], 1, ["model.decoders[0].loss_weight", "nan"]),
    (["--model.encoders=[{name: vision, freeze: maybe}]"], 1, ["model.encoders[0].freeze", "bool", "maybe"]),
    (["--model.encoders=[{name: vision, placeholder: 99999}]"], 1, ["model.encoders[0].placeholder", "99999"]),
]


@pytest.mark.parametrize("argv,world,words", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_config_is_one_clear_line(argv, world, words):
    with pytest.raises(ConfigError) as err:
        load(["--config", TINY, *argv] if argv[0] != "--config" else argv, world)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_bad_yaml_key_and_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stpes: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stpes.*train\.steps"):
        load_config(str(bad))
    bad.write_text("trainer:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="trainer"):
        load_config(str(bad))
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_cli_exits_2_with_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain_omni.py"), "--config", TINY, "--train.lrr=1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: unknown config key 'train.lrr' (did you mean 'train.lr'?)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_cuda_asked_for_on_a_machine_without_one_is_a_config_error():
    from engine.comm.backends import resolve_device
    with pytest.raises(ConfigError, match=r"'train.device' is cuda .*--train.device=cpu"):
        resolve_device("cuda")
