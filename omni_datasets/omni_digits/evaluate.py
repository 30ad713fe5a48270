#!/usr/bin/env python
"""Evaluate an omni model trained on omni-digits, on the held-out split.

    python -m omni_datasets.omni_digits.evaluate OUTPUT_DIR    # latest complete checkpoint in OUTPUT_DIR
    python -m omni_datasets.omni_digits.evaluate OUTPUT_DIR --checkpoint OUTPUT_DIR/checkpoints/step_00000300 --samples 5
    python -m omni_datasets.omni_digits.evaluate OUTPUT_DIR --conversations data/sft_omni/heldout.jsonl  # sft_omni

Scores (fractions), written to OUTPUT_DIR/eval.json:
    image_to_digit     held-out images, greedy answer names the digit
    audio_to_digit     held-out voice combinations, single spoken digits
    audio_to_digits    held-out voice combinations, spoken digit sequences (exact sequence)
    video_to_digits    videos of 2-4 held-out images (exact sequence)
    text_to_image      "draw a seven:" / "draw the digit 7:" -> greedy image_vq codes -> pixels
                       (lm_generate) -> a logistic-regression classifier trained on the
                       training images says the requested digit
    text_to_image_sampled   the same with sampled codes (temperature 1), --samples per prompt
plus the classifier's accuracy on real held-out images and on their VQ reconstructions
(the ceiling of text_to_image), and OUTPUT_DIR/eval_text_to_image.png, a grid of the
generated digits (row = digit; columns: a real held-out image, greedy per prompt, samples).

The model is read from the DCP checkpoint without a process group; its config is the one
saved in the checkpoint (trainer.config), or --config YAML. Generation recomputes the whole
prefix at every step (no KV cache): sequences are a few dozen tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from engine.config import ConfigError
from engine.data import DataError, OmniSample, pack_rows

log = logging.getLogger("eval_omni")


# ------------------------------------------------------------------------ model

def load_checkpoint_model(output_dir: Path, checkpoint: str | None, config: str | None):
    """(config, model on CPU in eval mode, checkpoint path)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    from engine.checkpoint import DCPSource, latest_complete
    from engine.config import load_config
    from engine.models import build_model

    path = Path(checkpoint) if checkpoint else latest_complete(output_dir)
    if path is None:
        raise ValueError(f"no complete checkpoint under {output_dir}/checkpoints; train with checkpoint.enabled=true "
                         "(the last step is always saved) or pass --checkpoint")
    cfg = load_config(config) if config else DCPSource(path).saved_config()
    if cfg is None:
        raise ValueError(f"{path} holds no trainer.config; pass the training YAML with --config")
    model = build_model(cfg.model)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    model.load_state_dict(state["model"])
    return cfg, model.eval(), path


@torch.no_grad()
def embed_batch(model, batch: dict) -> torch.Tensor:
    """Input embeddings [B, S, H] of a packed batch, as OmniModel.forward builds them
    (encoder outputs and decoder code embeddings written into their placeholders)."""
    ids, payloads = batch.input_ids, batch.payloads
    emb = model.backbone.embed(ids)
    for name, enc in model.encoders.items():
        if name in payloads:
            rows = enc.lm_encode(payloads[name])
            if name in model.encoder_proj:  # project: false (a released model's encoder) has none
                rows = model.encoder_proj[name](rows)
            emb = model._place(emb, ids, model.ph[name], batch.ph_index, rows, name, True)
    for name, dec in model.decoders.items():
        if name in payloads:
            rows = model.decoder_proj[name](dec.lm_encode(payloads[name])[0])
            emb = model._place(emb, ids, model.ph[name], batch.ph_index, rows, name, True)
    return emb


def prefix_batch(model, data, samples: list[OmniSample], extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings [B, max_len + extra, H] zero-padded on the right, prefix lengths [B])."""
    longest = max(len(s) for s in samples)
    parts = {**dict(model.encoders.items()), **dict(model.decoders.items())}
    batch = pack_rows([[s] for s in samples], longest, data.pad_id, model.ph, list(model.decoders), parts)
    emb = embed_batch(model, batch)
    emb = torch.cat([emb, emb.new_zeros(emb.shape[0], extra, emb.shape[2])], dim=1)
    return emb, torch.tensor([len(s) for s in samples])


@torch.no_grad()
def last_hidden(model, emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden state at each row's last position [B, H] (causal: what follows
    a row's prefix does not matter)."""
    s = int(lengths.max())
    pos = torch.arange(s)[None].expand(emb.shape[0], s)
    hidden = model.backbone(position_ids=pos, inputs_embeds=emb[:, :s], return_hidden=True)
    return hidden[torch.arange(emb.shape[0]), lengths - 1]


@torch.no_grad()
def greedy_text(model, data, samples: list[OmniSample], text_vocab: int, max_new: int = 12) -> list[list[int]]:
    """Greedy continuation of each sample's prefix, up to EOS or max_new tokens."""
    emb, lengths = prefix_batch(model, data, samples, max_new)
    out = [[] for _ in samples]
    done = torch.zeros(len(samples), dtype=torch.bool)
    rows = torch.arange(len(samples))
    for _ in range(max_new):
        logits = model.backbone.logits(last_hidden(model, emb, lengths))[:, :text_vocab]
        nxt = logits.argmax(-1)
        for i in torch.nonzero(~done).flatten().tolist():
            if int(nxt[i]) == data.eos_id:
                done[i] = True
            else:
                out[i].append(int(nxt[i]))
        if bool(done.all()):
            break
        emb[rows, lengths] = model.backbone.embed(nxt).to(emb.dtype)
        lengths = lengths + 1
    return out


@torch.no_grad()
def generate_codes(model, data, samples: list[OmniSample], name: str, temperature: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Image codes [B, codes_per_image] after each prompt: greedy (temperature 0) or sampled.
    Each code's embedding is fed back as OmniModel.forward places a target's codes."""
    dec = model.decoders[name]
    n = dec.codes_per_image
    emb, lengths = prefix_batch(model, data, samples, n)
    rows = torch.arange(len(samples))
    codes = []
    for _ in range(n):
        hidden = last_hidden(model, emb, lengths)
        logits = dec.lm_head(hidden, torch.full((len(samples),), -100))[1].float()
        if temperature > 0:
            code = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        else:
            code = logits.argmax(-1)
        codes.append(code)
        e = model.decoder_proj[name](dec.generation_aligner(dec.generation_embeddings(code)))
        emb[rows, lengths] = e.to(emb.dtype)
        lengths = lengths + 1
    return torch.stack(codes, dim=1)


# ------------------------------------------------------------------------ tasks

def chunks(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def answers(model, data, specs, text_vocab, batch_size) -> list[list[int]]:
    from .source import parse_digits

    got = []
    for group in chunks(specs, batch_size):
        samples = [data.build_sample(s, with_answer=False) for s in group]
        for toks in greedy_text(model, data, samples, text_vocab):
            got.append(parse_digits(data.tokenizer.decode(toks)))
    return got


def to_classifier_space(pixels: torch.Tensor) -> np.ndarray:
    """[N, C, S, S] in [-1, 1] -> [N, 64] in [0, 1] (8x8 as scikit-learn's digits, channel mean)."""
    x = (pixels.float().mean(1, keepdim=True) + 1) / 2
    if x.shape[-1] != 8:
        x = torch.nn.functional.adaptive_avg_pool2d(x, 8)
    return x.reshape(x.shape[0], -1).clamp(0, 1).numpy()


def digit_classifier(root: Path):
    """Logistic regression on the training images (scikit-learn's digits, train split)."""
    from sklearn.linear_model import LogisticRegression

    from .build import IMAGE_MAX, load_split

    items, _ = load_split(root, "train")
    x = np.stack([it.data for it in items if it.kind == "image"]).reshape(-1, 64) / IMAGE_MAX
    y = np.array([it.digits[0] for it in items if it.kind == "image"])
    return LogisticRegression(max_iter=3000).fit(x, y)


def save_grid(path: Path, columns: list[torch.Tensor], cell: int = 32) -> None:
    """columns: each [10, C, S, S] in [-1, 1] (row = digit) -> a PNG grid."""
    from PIL import Image

    pad = 2
    w, h = len(columns) * (cell + pad) + pad, 10 * (cell + pad) + pad
    canvas = Image.new("L", (w, h), 128)
    for c, col in enumerate(columns):
        for r in range(10):
            x = ((col[r].float().mean(0) + 1) / 2).clamp(0, 1).numpy()
            img = Image.fromarray((255 - x * 255).astype(np.uint8)).resize((cell, cell), Image.NEAREST)
            canvas.paste(img, (pad + c * (cell + pad), pad + r * (cell + pad)))
    canvas.save(path)


def evaluate(output_dir: Path, checkpoint=None, config=None, limit=None, samples=5, batch_size=128,
             seed=0, out=None) -> dict:
    from engine.config import expand_path
    from engine.data import ensure_corpus, load_or_train_tokenizer
    from engine.models import text_vocab_size

    from .build import ensure_omni_digits
    from .source import DRAW_PROMPTS, OmniDigitsData

    t0 = time.perf_counter()
    cfg, model, path = load_checkpoint_model(output_dir, checkpoint, config)
    cache = expand_path(cfg.data.cache_dir)
    root = ensure_omni_digits(cache)
    text_vocab = text_vocab_size(cfg.model)
    tok = load_or_train_tokenizer(cache, cfg.data.tokenizer, text_vocab, ensure_corpus(cache))
    parts = {**dict(model.encoders.items()), **dict(model.decoders.items())}
    data = OmniDigitsData(root, tok, np.zeros(0, dtype=np.int32), parts, model.ph, list(model.decoders),
                          cfg.data.seq_len, seed, split="heldout")
    rng = np.random.default_rng(seed)

    def cap(xs):
        return xs if limit is None else xs[:limit]

    result: dict = {"checkpoint": str(path), "step": int(path.name.split("_")[-1]) if "_" in path.name else None}
    if data.vision:
        specs = cap([data.spec_for("image", (i,)) for i in range(len(data.images))])
        got = answers(model, data, specs, text_vocab, batch_size)
        result["image_to_digit"] = float(np.mean([g == [data.images[s.items[0]].digits[0]] for g, s in zip(got, specs)]))
        result["image_to_digit_n"] = len(specs)
        vids = []
        for _ in range(200 if limit is None else limit):
            k = int(rng.integers(2, 5))
            vids.append(data.spec_for("video", tuple(int(i) for i in rng.integers(len(data.images), size=k))))
        got = answers(model, data, vids, text_vocab, batch_size)
        truth = [[data.images[i].digits[0] for i in s.items] for s in vids]
        result["video_to_digits"] = float(np.mean([g == t for g, t in zip(got, truth)]))
        result["video_to_digits_n"] = len(vids)
    if data.audio:
        for key, single in (("audio_to_digit", True), ("audio_to_digits", False)):
            idx = cap([i for i, it in enumerate(data.audio_items) if (len(it.digits) == 1) == single])
            specs = [data.spec_for("audio", (i,)) for i in idx]
            got = answers(model, data, specs, text_vocab, batch_size)
            result[key] = float(np.mean([g == list(data.audio_items[i].digits) for g, i in zip(got, idx)])) \
                if idx else None
            result[f"{key}_n"] = len(idx)
    if data.image_vq:
        name = data.image_vq
        dec = model.decoders[name]
        clf = digit_classifier(root)
        real = torch.stack([data.vq_pixels(it)[0] for it in data.images])
        labels = np.array([it.digits[0] for it in data.images])
        result["classifier_heldout"] = float(clf.score(to_classifier_space(real), labels))
        with torch.no_grad():
            recon = dec.lm_generate(dec.encode_codes(real))
        result["vq_reconstruction"] = float(clf.score(to_classifier_space(recon), labels))
        # one real held-out image per digit, for the grid
        columns = [torch.stack([real[int(np.flatnonzero(labels == d)[0])] for d in range(10)])]
        prompts = [(t, d) for t in range(len(DRAW_PROMPTS)) for d in range(10)]

        def draw(temperature, repeat, gen=None):
            todo = [p for p in prompts for _ in range(repeat)]
            samples_ = [OmniSample(data._draw[t][d], [-100] * len(data._draw[t][d])) for t, d in todo]
            pix = []
            for group in chunks(samples_, batch_size):
                codes = generate_codes(model, data, group, name, temperature, gen)
                with torch.no_grad():
                    pix.append(dec.lm_generate(codes))
            pix = torch.cat(pix)
            pred = clf.predict(to_classifier_space(pix))
            want = np.array([d for _, d in todo])
            return float(np.mean(pred == want)), pix, todo

        result["text_to_image"], pix, todo = draw(0.0, 1)
        result["text_to_image_n"] = len(todo)
        for t in range(len(DRAW_PROMPTS)):
            columns.append(torch.stack([pix[todo.index((t, d))] for d in range(10)]))
        if samples > 0:
            gen = torch.Generator().manual_seed(seed)
            result["text_to_image_sampled"], pix, todo = draw(1.0, samples, gen)
            result["text_to_image_sampled_n"] = len(todo)
            for j in range(min(samples, 6)):  # the first prompt template's samples
                columns.append(torch.stack([pix[todo.index((0, d)) + j] for d in range(10)]))
        grid = Path(out or output_dir) / "eval_text_to_image.png"
        save_grid(grid, columns)
        result["grid"] = str(grid)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    folder = Path(out or output_dir)
    (folder / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="the training run's train.output_dir")
    parser.add_argument("--checkpoint", help="a checkpoints/step_XXXXXXXX directory (default: the latest complete)")
    parser.add_argument("--config", help="training YAML (default: the config saved in the checkpoint)")
    parser.add_argument("--limit", type=int, help="evaluate at most this many samples per task (quick checks)")
    parser.add_argument("--samples", type=int, default=5, help="sampled images per drawing prompt (0: greedy only)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="where eval.json and the PNG go (default: OUTPUT_DIR)")
    parser.add_argument("--conversations", help="held-out conversations JSONL: score a model fine-tuned on them "
                                                "(examples/configs/sft_omni.yaml) instead of the built-in tasks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_grad_enabled(False)
    try:
        if args.conversations:
            from .evaluate_conversations import evaluate_conversations

            result = evaluate_conversations(Path(args.output_dir), Path(args.conversations), args.checkpoint,
                                            args.config, args.limit, args.batch_size, args.out)
        else:
            result = evaluate(Path(args.output_dir), args.checkpoint, args.config, args.limit, args.samples,
                              args.batch_size, args.seed, args.out)
    except (ValueError, DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
