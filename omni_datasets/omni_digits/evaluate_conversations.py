"""Score a model fine-tuned on omni-digits conversations (examples/configs/sft_omni.yaml) on the
held-out conversations: each row's messages up to its last assistant turn become the prompt
(built exactly as training builds samples: engine.data.PromptEncoder, media decoded), the
model answers greedily, and the answer counts when it names the same digits as the held-out
assistant turn (or the same yes / no).

    python -m omni_datasets.omni_digits.evaluate outputs/sft_omni --conversations data/sft_omni/heldout.jsonl

Scores per task (the last user turn's media: image, audio, video, or two media) go to
OUTPUT_DIR/eval_conversations.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .evaluate import chunks, greedy_text, load_checkpoint_model
from .source import parse_digits


def task_of(messages: list[dict]) -> str:
    """image | audio | video | two_media | text: the media of the last user turn."""
    user = next(m for m in reversed(messages) if m.get("role") == "user")
    content = user.get("content")
    kinds = [p["type"] for p in content if isinstance(p, dict) and p.get("type") != "text"] \
        if isinstance(content, list) else []
    return "text" if not kinds else kinds[0] if len(kinds) == 1 else "two_media"


def answer_key(text: str):
    """What must match: the digits named, or yes / no."""
    words = text.lower().replace(".", " ").replace(",", " ").split()
    yes_no = [w for w in words if w in ("yes", "no")]
    return ("yes_no", yes_no[:1]) if yes_no else ("digits", parse_digits(text))


def evaluate_conversations(output_dir: Path, heldout: Path, checkpoint=None, config=None, limit=None,
                           batch_size=64, out=None) -> dict:
    from engine.data import DataError, PromptEncoder
    from engine.models import text_vocab_size

    t0 = time.perf_counter()
    cfg, model, path = load_checkpoint_model(output_dir, checkpoint, config)
    prompts = PromptEncoder(cfg)
    tokenizer = prompts.encoder.tokenizer
    rows = [json.loads(line) for line in Path(heldout).read_text().splitlines() if line.strip()]
    if limit is not None:
        rows = rows[:limit]
    cases = []
    for row in rows:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        cases.append((task_of(messages[:last]), messages[:last], messages[last]["content"]))
    data = SimpleNamespace(pad_id=0, eos_id=tokenizer.eos_id)
    text_vocab = text_vocab_size(cfg.model)
    scores: dict[str, list[bool]] = {}
    examples = []
    skipped: dict[str, int] = {}
    for group in chunks(cases, batch_size):
        samples, kept = [], []
        for case in group:
            try:
                samples.append(prompts.sample(case[1], Path(heldout).parent))
                kept.append(case)
            except DataError as e:  # unreadable media, a conversation the template refuses: counted
                reason = getattr(e, "reason", "error")
                skipped[reason] = skipped.get(reason, 0) + 1
        if not samples:
            continue
        for (task, _, want), toks in zip(kept, greedy_text(model, data, samples, text_vocab)):
            got = tokenizer.decode(toks)
            scores.setdefault(task, []).append(answer_key(got) == answer_key(want))
            if len(examples) < 8:
                examples.append({"task": task, "answer": want, "generated": got})
    result = {"checkpoint": str(path), **{task: float(np.mean(v)) for task, v in sorted(scores.items())},
              **{f"{task}_n": len(v) for task, v in sorted(scores.items())},
              "all": float(np.mean([x for v in scores.values() for x in v])) if scores else None,
              "skipped": skipped, "examples": examples,
              "seconds": round(time.perf_counter() - t0, 1)}
    folder = Path(out or output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval_conversations.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
