#!/usr/bin/env python
"""Greedy text generation from a model folder, to check a checkpoint by eye.

    python tools/generate.py FOLDER --prompt "Once upon a time"
    python tools/generate.py FOLDER --prompt "Who are you?" --chat --max-new-tokens 64

FOLDER is anything `engine.load_pretrained` reads (a Hugging Face Llama / Qwen2 / Qwen3 /
Qwen3-MoE / Qwen2-VL folder, or one written by `tools/convert_hf_checkpoint.py import`) that
also holds its tokenizer (tokenizer.json or a sentencepiece .model). The prompt is encoded
with that tokenizer as it is (no BOS unless --bos); with --chat it is first rendered as
`[{"role": "user", "content": PROMPT}]` by the folder's chat template with the generation
prompt, exactly as transformers' `apply_chat_template(..., add_generation_prompt=True)`, and
the special tokens the template writes are parsed as such. Decoding is greedy (the argmax at
each step, `engine.models.generate.greedy_generate`, which recomputes the whole prefix at each
step: no KV cache) and stops at the tokenizer's EOS or any eos id of generation_config.json.
The continuation is printed, decoded without special tokens.

Training checkpoints (checkpoints/step_XXXXXXXX, sharded DCP) are not read here: the engine
has no one-process DCP loader for model folders yet, so export one first and generate from
the export:
    python tools/convert_hf_checkpoint.py export outputs/run/checkpoints/step_00000100 OUT_DIR
    python tools/generate.py OUT_DIR --prompt "..."
Images and videos in the prompt (--image) are not supported yet: a Qwen2-VL folder generates
from text prompts only (image preprocessing is a separate piece of work).
Mistakes print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ("float32", "bfloat16", "float16")


def eos_ids(folder: Path, tokenizer) -> list[int]:
    """The tokenizer's EOS and generation_config.json's eos_token_id (an id or a list), in that order."""
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    path = folder / "generation_config.json"
    if path.is_file():
        try:
            extra = json.loads(path.read_text()).get("eos_token_id")
        except (ValueError, AttributeError):
            extra = None
        for i in extra if isinstance(extra, list) else [extra]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def prompt_ids(folder: Path, tokenizer, prompt: str, chat: bool, bos: bool) -> list[int]:
    from engine.data.chat import ChatTemplate

    if chat:
        text, _ = ChatTemplate.from_folder(folder).render([{"role": "user", "content": prompt}],
                                                          add_generation_prompt=True)
    else:
        text = prompt
    ids = list(tokenizer.encode(text))
    if bos:
        if tokenizer.bos_id is None:
            raise ValueError(f"the tokenizer of {folder} has no BOS token: drop --bos")
        ids = [tokenizer.bos_id] + ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens: give a non-empty --prompt")
    return ids


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="model folder with its tokenizer (Hugging Face or imported)")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true", help="render the prompt as a user turn with the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="most tokens to generate (default 32)")
    parser.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS id (Llama base models "
                                                           "expect it; chat templates write their own)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)

    try:
        if not folder.is_dir():
            raise ValueError(f"{folder} is not a directory: pass a model folder (config.json or config.yaml, "
                             "safetensors weights and the tokenizer)")
        if (folder / ".metadata").is_file():
            raise ValueError(f"{folder} is a training checkpoint (DCP): export it with tools/convert_hf_checkpoint.py "
                             f"export {folder} OUT_DIR and generate from OUT_DIR")
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        import torch

        import engine
        from engine.models.generate import greedy_generate

        tokenizer = engine.load_tokenizer(folder)
        ids = prompt_ids(folder, tokenizer, args.prompt, args.chat, args.bos)
        model = engine.load_pretrained(folder, dtype=getattr(torch, args.dtype), device=args.device)
        vocab = (getattr(model, "cfg", None) or model.config).vocab_size
        if max(ids) >= vocab:
            raise ValueError(f"the tokenizer of {folder} gives id {max(ids)}, but the model has {vocab} embeddings: "
                             "use the tokenizer the model was trained with")
        eos = eos_ids(folder, tokenizer)
        new = greedy_generate(model, torch.tensor([ids], device=args.device), args.max_new_tokens,
                              eos_token_id=eos or None)[0].tolist()
    except ValueError as e:  # HFCheckpointError, TokenizerError, ConversationError: one line, no traceback
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    stop = next((i for i, t in enumerate(new) if t in eos), len(new))
    print(tokenizer.decode(new[:stop]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
