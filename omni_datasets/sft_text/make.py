"""The fine-tuning example's files, made offline: a tiny transformers-saved Qwen2 with its
own tokenizer and ChatML chat template, and small conversation / text files.

    python -m omni_datasets.sft_text.make [--out data/sft_text]

writes under OUT:
    qwen2_tiny/            Qwen2ForCausalLM (random init, 4 layers) + tokenizer.json,
                           tokenizer_config.json, chat_template.jinja (Qwen2's template)
    conversations.jsonl    {"messages": [system?, user, assistant, ...]} rows
    conversations.parquet  the same rows in Parquet
    text.jsonl             {"text": ...} documents (for data.dataset=text)

The tokenizer is a byte-level BPE trained on the texts; the conversations ask to continue
or to name the speaker of a passage of the Shakespeare corpus (or of any texts given).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# Qwen2's own chat template (ChatML, default system prompt).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(folder: Path, texts: list[str], vocab_size: int = 512) -> None:
    """A byte-level BPE of `vocab_size` ids (specials included), saved as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=QWEN2_CHAT_TEMPLATE)
    fast.save_pretrained(folder)


def make_model(folder: Path, vocab_size: int, seed: int = 0) -> None:
    """A tiny Qwen2ForCausalLM (random init), saved as safetensors."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, rope_theta=10000.0)
    Qwen2ForCausalLM(config).save_pretrained(folder)


def conversations(texts: list[str], n: int, seed: int = 0) -> list[dict]:
    """Rows of {"messages": [...]}: continue a passage, one or two turns, some with a system prompt."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choice(texts).split()
        if len(words) < 12:
            continue
        cut = rng.randint(4, min(len(words) - 4, 40))
        end = min(len(words), cut + rng.randint(4, 30))
        messages = [{"role": "system", "content": "You continue passages of Shakespeare."}] if rng.random() < 0.3 else []
        messages += [{"role": "user", "content": "Continue: " + " ".join(words[:cut])},
                     {"role": "assistant", "content": " ".join(words[cut:end])}]
        if rng.random() < 0.3 and end + 4 < len(words):
            messages += [{"role": "user", "content": "And then?"},
                         {"role": "assistant", "content": " ".join(words[end:end + rng.randint(2, 20)])}]
        rows.append({"messages": messages})
    return rows


def write_rows(rows: list[dict], path: Path) -> None:
    """JSONL, or Parquet when the name ends in .parquet (pyarrow)."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=256)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make(out: Path, texts: list[str], n_conversations: int = 2000, vocab_size: int = 512) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out / "qwen2_tiny", texts, vocab_size)
    make_model(out / "qwen2_tiny", vocab_size)
    rows = conversations(texts, n_conversations)
    write_rows(rows, out / "conversations.jsonl")
    write_rows(rows, out / "conversations.parquet")
    write_rows([{"text": t} for t in texts], out / "text.jsonl")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/sft_text")
    parser.add_argument("--cache-dir", default="~/.cache/omni-engine", help="where the Shakespeare corpus is cached")
    parser.add_argument("--conversations", type=int, default=2000)
    args = parser.parse_args(argv)
    from engine.data import ensure_corpus, load_documents

    texts = list(load_documents(ensure_corpus(Path(args.cache_dir).expanduser())))
    out = make(Path(args.out), texts, args.conversations)
    print(f"wrote {out}: qwen2_tiny/, conversations.jsonl, conversations.parquet, text.jsonl")


if __name__ == "__main__":
    main()
