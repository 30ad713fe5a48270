"""The user's own data: data.dataset text and conversations (JSONL, Parquet, prepared
folders), the checkpoint's tokenizer and chat template, mixtures, validation, resume, and
bad input (skipped and counted, or strict one-line errors)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ConfigError, load_config
from engine.data.errors import DataError
from engine.data.token_shards import TokenShards
from engine.data.tokenize_corpus import EncodeSpec, prepare_folder
from engine.data.user_data import Draws, build_user_data
from launch import ROOT, assert_close, losses, train
from omni_datasets.sft_text import make as sft

CONFIG = str(ROOT / "examples" / "configs" / "sft_text.yaml")


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A tiny transformers-saved Qwen2 with its tokenizer and ChatML template, conversations
    (JSONL and Parquet) and text documents, made from 600 Shakespeare documents."""
    from engine.data import ensure_corpus, load_documents

    texts = list(load_documents(ensure_corpus(Path("~/.cache/omni-engine").expanduser())))[:600]
    return sft.make(tmp_path_factory.mktemp("sft"), texts, n_conversations=240)


def overrides(sft_dir: Path, tmp: Path, **keys) -> list[str]:
    base = {"model.init_from": sft_dir / "qwen2_tiny", "data.path": sft_dir / "conversations.jsonl",
            "data.cache_dir": tmp / "cache", "data.seq_len": 128, "data.global_batch_size": 8,
            "data.eval_fraction": 0.0, "train.steps": 3, "train.eval_interval": 0, "train.tensorboard": False,
            "checkpoint.enabled": False}
    base.update(keys)
    return [f"--{k}={v}" for k, v in base.items()]


def config(sft_dir: Path, tmp: Path, **keys):
    args = overrides(sft_dir, tmp, **keys)
    return load_config(CONFIG, [tuple(a[2:].split("=", 1)) for a in args])


# ---- tokens and masks ------------------------------------------------------------------------
def test_conversation_tokens_equal_transformers_chat_template(sft_dir, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(sft_dir / "qwen2_tiny")
    rows = [json.loads(line) for line in (sft_dir / "conversations.jsonl").read_text().splitlines()][:40]
    spec = EncodeSpec("conversations", str(sft_dir / "qwen2_tiny"))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = TokenShards(prepare_folder([tmp_path / "c.jsonl"], tmp_path / "prep", spec) and tmp_path / "prep")
    assert len(shards) == len(rows)
    end = hf.convert_tokens_to_ids("<|im_end|>")
    for i, row in enumerate(rows):
        ids, mask = shards.document(i)
        want = hf.apply_chat_template(row["messages"], tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert ids.tolist() == list(want)
        # targets: each assistant turn's content and its <|im_end|>, nothing else
        turns = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert hf.decode(ids[mask]) == "".join(t + "<|im_end|>" for t in turns)
        assert int((ids[mask] == end).sum()) == len(turns)


def test_text_documents_end_with_eos_and_keep_every_token(sft_dir, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(sft_dir / "qwen2_tiny")
    rows = [json.loads(line) for line in (sft_dir / "text.jsonl").read_text().splitlines()][:50]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_folder([tmp_path / "t.jsonl"], tmp_path / "prep", EncodeSpec("text", str(sft_dir / "qwen2_tiny")))
    shards = TokenShards(tmp_path / "prep")
    for i, row in enumerate(rows):
        ids, _ = shards.document(i)
        assert ids.tolist() == hf(row["text"], add_special_tokens=False)["input_ids"] + [hf.eos_token_id]


def test_prepare_data_in_two_processes_equals_one_and_the_on_the_fly_cache(sft_dir, tmp_path):
    big = tmp_path / "text.jsonl"
    big.write_text((sft_dir / "text.jsonl").read_text() * 2)
    cfg = config(sft_dir, tmp_path, **{"data.dataset": "text", "data.path": big})
    spec = EncodeSpec("text", str(sft_dir / "qwen2_tiny"))
    prepare_folder([big], tmp_path / "one", spec, processes=1, chunk_bytes=1 << 30)
    prepare_folder([big], tmp_path / "two", spec, processes=2, chunk_bytes=big.stat().st_size // 5)
    one, two = TokenShards(tmp_path / "one"), TokenShards(tmp_path / "two")
    assert len(two.meta["shards"]) >= 5
    assert np.array_equal(one.doc_offsets, two.doc_offsets)
    assert np.array_equal(one.tokens[0:len(one.tokens)], two.tokens[0:len(two.tokens)])
    # training from the prepared folder reads the same batches as from the file itself
    from_files = build_user_data(cfg).micro_batches(2, 8, 0, 1, 8)[0]
    cfg.data.path = [str(tmp_path / "two")]
    from_folder = build_user_data(cfg).micro_batches(2, 8, 0, 1, 8)[0]
    for key in ("input_ids", "labels", "position_ids", "doc_ids"):
        assert torch.equal(from_files[key], from_folder[key]), key


# ---- packing, mixtures, truncation ------------------------------------------------------------
def test_mixture_draws_follow_the_weights_and_cover_each_source_per_epoch():
    draws = Draws([10, 30], [1.0, 3.0], seed=0)
    picked = [draws[k] for k in range(400)]
    sources = [s for s, _ in picked]
    assert sources.count(0) == 100 and sources.count(1) == 300
    assert all(abs(sources[:k].count(0) - k / 4) <= 1 for k in range(1, 400))  # in proportion all along
    first_epoch = [i for s, i in picked if s == 0][:10]
    assert sorted(first_epoch) == list(range(10))


def test_conversations_pack_whole_samples_and_long_ones_are_skipped_or_cut(sft_dir, tmp_path):
    cfg = config(sft_dir, tmp_path, **{"data.seq_len": 96})
    data = build_user_data(cfg)
    n_long = data.skipped_counts()["too_long"]
    assert n_long > 0
    batch = data.micro_batches(0, 8, 0, 1, 8)[0]
    for row in range(8):
        doc, ids = batch.doc_ids[row], batch.input_ids[row]
        real = batch.labels[row] != -100
        assert real.any()
        for d in doc[real].unique().tolist():  # every sample starts at position 0: whole samples
            at = (doc == d).nonzero().flatten()
            assert batch.position_ids[row, at].tolist() == list(range(len(at)))
    cfg.data.truncate = True
    cut = build_user_data(cfg)
    assert cut.skipped_counts()["truncated"] == n_long and "too_long" not in cut.skipped_counts()
    assert max(s.length(i) for s in cut.sources for i in range(len(s))) == 96


def test_tokenizer_larger_than_the_model_is_one_line_error(sft_dir, tmp_path):
    cfg = config(sft_dir, tmp_path)
    cfg.model.vocab_size = 300
    with pytest.raises(ConfigError, match=r"has 512 ids but the model has 300 text ids.*raise model.vocab_size"):
        build_user_data(cfg)


# ---- bad input ---------------------------------------------------------------------------------
FAILING_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}"
                    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


def _ok(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} said"}]}


BAD_ROWS = {  # reason -> a JSONL line
    "bad_json": '{"messages": [',
    "no_messages": json.dumps({"text": "no messages here"}),
    "unknown_role": json.dumps({"messages": [{"role": "narrator", "content": "x"},
                                             {"role": "assistant", "content": "y"}]}),
    "empty_assistant": json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}),
    "template": json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "{}"},
                                         {"role": "assistant", "content": "y"}]}),
}


def _bad_file(tmp_path: Path) -> Path:
    lines = [json.dumps(_ok(i)) for i in range(20)]
    for k, (_, line) in enumerate(BAD_ROWS.items()):
        lines.insert(3 + 3 * k, line)
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_each_bad_row_is_skipped_and_counted_by_reason(sft_dir, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(FAILING_TEMPLATE)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    cfg = config(sft_dir, tmp_path, **{"data.path": f"[{_bad_file(tmp_path)}, {broken}]",
                                       "data.chat_template": template})
    data = build_user_data(cfg)
    assert data.skipped_counts() == {**dict.fromkeys(BAD_ROWS, 1), "unreadable_file": 1}
    assert len(data.sources[0]) == 20


@pytest.mark.parametrize("reason", list(BAD_ROWS))
def test_strict_names_the_file_and_line_of_a_bad_row(sft_dir, tmp_path, reason):
    template = tmp_path / "t.jinja"
    template.write_text(FAILING_TEMPLATE)
    good = [json.dumps(_ok(i)) for i in range(4)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([*good[:2], BAD_ROWS[reason], *good[2:]]) + "\n")
    cfg = config(sft_dir, tmp_path, **{"data.path": path, "data.chat_template": template, "data.strict": True})
    with pytest.raises(DataError) as err:
        build_user_data(cfg)
    assert "\n" not in str(err.value) and f"{path}:3" in str(err.value), str(err.value)


def test_text_rows_without_the_field_are_counted_and_strict_exits_2(sft_dir, tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"text": "one two three " * 20}, {"body": "wrong field"}, {"text": ""}, {"text": "four five " * 30}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_user_data(config(sft_dir, tmp_path, **{"data.dataset": "text", "data.path": path,
                                                        "data.seq_len": 16}))
    assert data.skipped_counts() == {"no_text_field": 1, "empty_text": 1}
    out = train(tmp_path / "run", 1, *overrides(sft_dir, tmp_path, **{"data.dataset": "text", "data.path": path,
                                                                        "data.strict": True}),
                config=CONFIG, expect_rc=2)
    stderr = out[0]["stderr"]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"error: {path}:2: has no string field 'text'"), stderr


@pytest.mark.parametrize("keys,message", [
    ({"data.path": "/nonexistent/data.jsonl"}, r"'data.path' entry '/nonexistent/data.jsonl' does not exist"),
    ({"data.tokenizer": "EMPTY"}, r"has no tokenizer.json or sentencepiece .model"),
    ({"data.path": "ALLBAD"}, r"no usable rows \(skipped: \{'no_messages': 2\}\)"),
    ({"data.dataset": "text", "data.path": "TINY", "data.seq_len": 4096}, r"fewer than one sequence"),
])
def test_unusable_data_is_one_line_error(sft_dir, tmp_path, keys, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "ALLBAD.jsonl").write_text('{"x": 1}\n{"y": 2}\n')
    (tmp_path / "TINY.jsonl").write_text('{"text": "just a few words"}\n')
    keys = {k: {"EMPTY": tmp_path / "EMPTY", "ALLBAD": tmp_path / "ALLBAD.jsonl", "TINY": tmp_path / "TINY.jsonl"}
            .get(v, v) for k, v in keys.items()}
    with pytest.raises((ConfigError, DataError), match=message) as err:
        build_user_data(config(sft_dir, tmp_path, **keys))
    assert "\n" not in str(err.value)


# ---- training: formats, resume, layouts ------------------------------------------------------
def test_parquet_and_jsonl_of_the_same_rows_give_the_same_batches(sft_dir, tmp_path):
    jsonl = build_user_data(config(sft_dir, tmp_path))
    parquet = build_user_data(config(sft_dir, tmp_path, **{"data.path": sft_dir / "conversations.parquet"}))
    for step in (0, 7, 40):
        a, b = jsonl.micro_batches(step, 8, 0, 1, 8)[0], parquet.micro_batches(step, 8, 0, 1, 8)[0]
        for key in ("input_ids", "labels", "position_ids", "doc_ids"):
            assert torch.equal(a[key], b[key]), (step, key)


def test_resume_mid_epoch_repeats_the_loss_trace(sft_dir, tmp_path):
    rows = [json.loads(line) for line in (sft_dir / "conversations.jsonl").read_text().splitlines()][:30]
    random.Random(0).shuffle(rows)
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = {"data.path": path, "data.seq_len": 256, "data.global_batch_size": 4, "train.steps": 8,
            "checkpoint.enabled": True, "checkpoint.interval": 3, "data.eval_fraction": 0.1, "train.eval_interval": 4}
    whole = train(tmp_path / "whole", 1, *overrides(sft_dir, tmp_path, **keys), config=CONFIG)
    assert len(rows) * 0.9 / 4 < 8  # the run crosses an epoch boundary
    train(tmp_path / "part", 1, *overrides(sft_dir, tmp_path, **{**keys, "train.steps": 3}), config=CONFIG)
    resumed = train(tmp_path / "part", 1, *overrides(sft_dir, tmp_path, **keys), config=CONFIG)
    assert losses(resumed) == losses(whole)  # the resumed run's file holds steps 1-3 and 4-8
    evals = {r["step"]: r["eval_loss"] for r in whole if "eval_loss" in r}
    assert sorted(evals) == [4, 8] and min(evals.values()) > 0
    assert {r["step"]: r["eval_loss"] for r in resumed if r["step"] in evals} == evals
    assert "eval_loss" in resumed[2]  # the first part's last step also validated


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["text", "conversations"])
def test_one_process_equals_fsdp2_and_sp2(sft_dir, tmp_path, dataset):
    """Loss parity (fp32, 1e-5) with validation; text as a weighted mixture of a JSONL and a
    Parquet source, whose per-source losses are logged."""
    if dataset == "text":
        half = [json.loads(line) for line in (sft_dir / "text.jsonl").read_text().splitlines()][:300]
        sft.write_rows(half, tmp_path / "more.parquet")
        keys = {"data.dataset": "text", "data.path": f"[{sft_dir / 'text.jsonl'}, {tmp_path / 'more.parquet'}]",
                "data.weights": "[1, 3]", "data.eval_fraction": 0.02}
    else:
        keys = {"data.eval_fraction": 0.1}
    keys.update({"train.steps": 4, "train.eval_interval": 2})
    ref = train(tmp_path / "one", 1, *overrides(sft_dir, tmp_path, **keys), config=CONFIG)
    fsdp = train(tmp_path / "fsdp", 2, *overrides(sft_dir, tmp_path, **keys), config=CONFIG)
    sp = train(tmp_path / "sp", 2, *overrides(sft_dir, tmp_path, **keys, **{"parallel.sp_size": 2}), config=CONFIG)
    for other in (fsdp, sp):
        assert_close(losses(ref), losses(other), rel=1e-5)
        assert_close([r["eval_loss"] for r in ref if "eval_loss" in r],
                     [r["eval_loss"] for r in other if "eval_loss" in r], rel=1e-5)
    if dataset == "text":
        for other in (ref, fsdp, sp):
            assert all({"loss_lm/text", "loss_lm/more"} <= set(r) for r in other)
        assert_close([r["loss_lm/more"] for r in ref], [r["loss_lm/more"] for r in sp], rel=1e-5)


def test_a_folder_prepared_with_another_tokenizer_is_refused(sft_dir, tmp_path):
    other = tmp_path / "other_tok"
    sft.make_tokenizer(other, ["some other words entirely"] * 50, vocab_size=300)
    prepare_folder([sft_dir / "conversations.jsonl"], tmp_path / "prep", EncodeSpec("conversations", str(other)))
    with pytest.raises(DataError, match="was tokenised with another tokenizer or chat template"):
        build_user_data(config(sft_dir, tmp_path, **{"data.path": tmp_path / "prep"}))


def test_packing_memory_stays_flat_and_rows_are_a_pure_function_of_the_step(sft_dir, tmp_path):
    cfg = config(sft_dir, tmp_path, **{"data.seq_len": 256})
    a, b = build_user_data(cfg), build_user_data(cfg)
    late = a.micro_batches(400, 8, 0, 1, 8)[0]  # far past one block: only block row counts are kept
    assert len(a._blocks) <= 4 and len(a._block_starts) > 3
    early_then_late = [b.micro_batches(s, 8, 0, 1, 8)[0] for s in (1, 400)][1]
    assert torch.equal(late.input_ids, early_then_late.input_ids) and torch.equal(late.labels, early_then_late.labels)


def test_validation_pass_covers_every_held_out_sample_once(sft_dir, tmp_path):
    rows = [json.loads(line) for line in (sft_dir / "conversations.jsonl").read_text().splitlines()][:25]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(sft_dir, tmp_path, **{"data.eval_path": tmp_path / "eval.jsonl", "data.seq_len": 256})
    data = build_user_data(cfg, evaluation=True)
    kept = len(data.sources[0])
    assert kept == 25 - data.skipped_counts().get("too_long", 0) > 0
    n_rows = data.num_rows()
    seen = sorted(i for r in range(n_rows) for _, i in data._row(r))
    assert seen == list(range(kept)) and data._row(n_rows) == []
    batch = data.micro_batches(-(-n_rows // 8), 8, 0, 1, 8)[0]  # past the pass: no targets
    assert bool((batch.labels == -100).all())


def test_prepared_folder_name_changes_with_the_prepared_format(tmp_path, monkeypatch):
    """Folders prepared under older token-counting rules are prepared again, not reused."""
    from engine.data import tokenize_corpus

    rows, tok = tmp_path / "rows.jsonl", tmp_path / "tokenizer.json"
    rows.write_text('{"text": "hello"}\n')
    tok.write_text("{}")
    spec = tokenize_corpus.EncodeSpec(kind="text", tokenizer=str(tok))
    before = spec.fingerprint([rows])
    assert spec.fingerprint([rows]) == before
    monkeypatch.setattr(tokenize_corpus, "PREPARED_FORMAT", tokenize_corpus.PREPARED_FORMAT + 1)
    assert spec.fingerprint([rows]) != before
