"""Greedy generation (engine.models.generate, tools/generate.py): the new tokens equal
transformers' `generate(do_sample=False)` for a tiny Qwen2 (with and without an early EOS, one
row and a batch whose rows stop at different steps) and a tiny Qwen2-VL with an image prompt;
the CLI prints a continuation and turns mistakes into one line with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine
from engine.models.generate import greedy_generate
from launch import tool

transformers = pytest.importorskip("transformers")

VOCAB = 128


def tiny_qwen2(folder: Path, vocab_size: int = VOCAB, seed: int = 0):
    """A random transformers Qwen2ForCausalLM, with weights larger than the default init (so that
    greedy decoding does not repeat one token), saved to `folder`."""
    cfg = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def hf_new_tokens(model, input_ids, n, eos, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos, **kw)
    return out[:, input_ids.shape[1]:]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2")
    hf = tiny_qwen2(folder)
    return hf, engine.load_pretrained(folder)


def prompts(rows: int, length: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(rows))


def test_text_tokens_equal_transformers_without_eos(qwen2):
    hf, ours = qwen2
    ids = prompts(1)
    got = greedy_generate(ours, ids, 12)
    free = got[0].tolist()
    assert got.shape == (1, 12) and len(set(free)) > 3, free  # not degenerate
    # an eos the model never emits: all 12 steps, as transformers
    unused = next(t for t in range(VOCAB) if t not in free)
    assert greedy_generate(ours, ids, 12, eos_token_id=unused).tolist() == [free]
    assert hf_new_tokens(hf, ids, 12, unused).tolist() == [free]
    # the reference also agrees when run through greedy_generate (output objects with .logits)
    assert greedy_generate(hf, ids, 12).tolist() == [free]


def test_text_generation_stops_at_eos_as_transformers(qwen2):
    hf, ours = qwen2
    ids = prompts(1)
    free = greedy_generate(ours, ids, 12)[0].tolist()
    stop = next(i for i in range(2, 12) if free[i] not in free[:i])  # an eos first emitted at step `stop`
    eos = free[stop]
    got = greedy_generate(ours, ids, 12, eos_token_id=eos)
    assert got.tolist() == [free[:stop + 1]]
    assert hf_new_tokens(hf, ids, 12, eos).tolist() == got.tolist()
    # a list of eos ids: the first one emitted stops it
    assert greedy_generate(ours, ids, 12, eos_token_id=[VOCAB + 5, eos]).tolist() == [free[:stop + 1]]


def test_a_batch_pads_finished_rows_with_eos_as_transformers(qwen2):
    hf, ours = qwen2
    ids = prompts(2)
    free = greedy_generate(ours, ids, 12).tolist()
    assert free == [greedy_generate(ours, ids[r:r + 1], 12)[0].tolist() for r in range(2)]  # rows are independent
    # an eos that ends row 0 early and row 1 later (or never)
    first = [{t: row.index(t) for t in reversed(row)} for row in free]
    eos = next(t for t, i in sorted(first[0].items(), key=lambda kv: kv[1])
               if 1 <= i < 10 and first[1].get(t, 12) > i + 1)
    stops = [first[r].get(eos, 11) for r in range(2)]
    n = max(stops) + 1
    want = [free[r][:stops[r] + 1] + [eos] * (n - stops[r] - 1) for r in range(2)]
    got = greedy_generate(ours, ids, 12, eos_token_id=eos)
    assert got.tolist() == want
    assert hf_new_tokens(hf, ids, 12, eos).tolist() == want


def test_padded_prompts_are_refused(qwen2):
    _, ours = qwen2
    ids = prompts(2)
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    with pytest.raises(ValueError, match="padded"):
        greedy_generate(ours, ids, 2, attention_mask=mask)


def test_qwen2_vl_image_prompt_tokens_equal_transformers(tmp_path):
    from test_qwen2_vl import hf_inputs, tiny_qwen2_vl

    hf = tiny_qwen2_vl(tmp_path)
    ours = engine.load_pretrained(tmp_path)
    kw = hf_inputs("one_image")
    hf.model.rope_deltas = None  # transformers keeps the last call's position offsets
    with torch.no_grad():
        want = hf.generate(**kw, max_new_tokens=8, do_sample=False, eos_token_id=None)[:, kw["input_ids"].shape[1]:]
    ids = kw.pop("input_ids")
    got = greedy_generate(ours, ids, 8, **kw)
    assert got.shape == (1, 8) and len(set(got[0].tolist())) > 2, got
    assert got.tolist() == want.tolist()
    # with an eos that it emits: stops there, as transformers does
    stop = next(i for i in range(1, 8) if got[0, i] not in got[0, :i])
    eos = int(got[0, stop])
    hf.model.rope_deltas = None
    with torch.no_grad():
        want = hf.generate(input_ids=ids, **kw, max_new_tokens=8, do_sample=False, eos_token_id=eos,
                           pad_token_id=eos)[:, ids.shape[1]:]
    assert greedy_generate(ours, ids, 8, eos_token_id=eos, **kw).tolist() == want.tolist() == [got[0, :stop + 1].tolist()]


# ---- the command line ------------------------------------------------------------------
def run_cli(*argv: str) -> int:
    return tool("generate").main(list(argv))


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    from omni_datasets.sft_text.make import make_tokenizer

    folder = tmp_path_factory.mktemp("qwen2_chat")
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "to be or not to be, that is the question " * 3,
             "all the world's a stage, and all the men and women merely players " * 2]
    make_tokenizer(folder, texts, vocab_size=300)
    tokenizer = engine.load_tokenizer(folder)
    tiny_qwen2(folder, vocab_size=tokenizer.vocab_size)
    return folder, tokenizer


def test_cli_prints_the_greedy_continuation(chat_folder, capsys):
    folder, tokenizer = chat_folder
    assert run_cli(str(folder), "--prompt", "to be or not", "--max-new-tokens", "6") == 0
    out = capsys.readouterr().out
    ours = engine.load_pretrained(folder)
    new = greedy_generate(ours, torch.tensor([tokenizer.encode("to be or not")]), 6, eos_token_id=tokenizer.eos_id)
    new = new[0].tolist()
    new = new[:new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    assert out == tokenizer.decode(new) + "\n" and out.strip()


def test_cli_chat_renders_the_template_with_special_tokens(chat_folder, capsys):
    folder, tokenizer = chat_folder
    cli = tool("generate")
    ids = cli.prompt_ids(folder, tokenizer, "hello", chat=True, bos=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    want = hf_tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                      tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert ids == list(want)
    assert ids.count(hf_tok.convert_tokens_to_ids("<|im_start|>")) == 3  # parsed as special tokens
    assert run_cli(str(folder), "--prompt", "hello", "--chat", "--max-new-tokens", "4") == 0
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize("case", ["missing_folder", "no_tokenizer", "no_chat_template", "dcp_checkpoint"])
def test_cli_mistakes_are_one_line_with_exit_code_2(case, tmp_path, capsys, chat_folder):
    folder, _ = chat_folder
    argv = [str(tmp_path / "nowhere"), "--prompt", "hi"]
    if case == "no_tokenizer":
        tiny_qwen2(tmp_path / "model")
        argv[0] = str(tmp_path / "model")
    elif case == "no_chat_template":
        bare = tmp_path / "bare"
        bare.mkdir()
        for f in folder.iterdir():
            if f.name not in ("chat_template.jinja", "tokenizer_config.json"):
                (bare / f.name).symlink_to(f)
        argv = [str(bare), "--prompt", "hi", "--chat"]
    elif case == "dcp_checkpoint":
        (tmp_path / "step_00000010").mkdir()
        (tmp_path / "step_00000010" / ".metadata").write_bytes(b"")
        argv[0] = str(tmp_path / "step_00000010")
    capsys.readouterr()  # what building the folders printed
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert {"missing_folder": "not a directory", "no_tokenizer": "tokenizer", "no_chat_template": "chat template",
            "dcp_checkpoint": "convert_hf_checkpoint.py export"}[case] in err
