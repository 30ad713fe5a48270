"""omni-digits' prepare step: the image_vq decoder's VQ tokenizer, pre-trained on the
training images before the language model learns its codes.

`prepare(cfg)` builds the dataset files, then trains one VQ-VAE per image_vq decoder
config (cached as `<dataset>/vq/image_vq_<hash>.safetensors`, keys `vqmodel.*`, which the
decoder's own `load_hf_weights` reads) and names the file as that decoder's `init_from`.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from engine.config import Config, expand_path
from engine.data import build_once
from engine.modalities import ImageVQDecoder, reconstruction_error, train_vqvae
from engine.models import RESERVED_KEYS

from .build import content_hash, ensure_omni_digits, image_to_unit, load_split, read_meta

log = logging.getLogger(__name__)

VQ_TRAIN = {"steps": 400, "lr": 2e-3, "batch_size": 32, "seed": 0}
_LM_ONLY = ("projection_dim", "num_hidden_layers", "hidden_act", "hidden_in", "train_vqvae")


def prepare(cfg: Config) -> dict[str, str]:
    """Dataset files, then {image_vq decoder name: its pre-trained VQ tokenizer file}."""
    root = ensure_omni_digits(expand_path(cfg.data.cache_dir))
    return {spec["name"]: str(ensure_vq_tokenizer(root, spec)) for spec in cfg.model.decoders
            if spec.get("name") == "image_vq"}


def _vq_options(spec: dict) -> dict:
    """The options of an image_vq spec that shape its VQ-VAE, defaults filled in."""
    params = inspect.signature(ImageVQDecoder.__init__).parameters
    opts = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    opts.update({k: v for k, v in spec.items() if k not in RESERVED_KEYS})
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items() if k not in _LM_ONLY}


def training_images(root: Path, size: int, channels: int) -> torch.Tensor:
    """[N, channels, size, size] in [-1, 1]: the training split's images."""
    items, _ = load_split(root, "train")
    images = [(image_to_unit(it.data, size) - 0.5) / 0.5 for it in items if it.kind == "image"]
    return torch.stack(images)[:, None].expand(-1, channels, -1, -1).contiguous()


def ensure_vq_tokenizer(root: str | Path, spec: dict, train: Optional[dict] = None) -> Path:
    """`<root>/vq/image_vq_<hash>.safetensors`: the VQ-VAE of an image_vq decoder with options
    `spec`, trained on the training images with `train_vqvae` the first time (under a file
    lock, so every rank may call this). Its statistics go to a `.json` beside it."""
    root = Path(root)
    train = {**VQ_TRAIN, **(train or {})}
    opts = _vq_options(spec)
    meta = read_meta(root)
    key = content_hash({"vq": opts, "train": train, "data": meta["options"]})
    path = root / "vq" / f"image_vq_{key}.safetensors"

    def build(tmp: Path) -> None:
        with torch.random.fork_rng():  # leave the caller's RNG stream untouched
            torch.manual_seed(train["seed"])
            dec = ImageVQDecoder(**opts)
        images = training_images(root, dec.image_size, dec.in_channels)
        log.info("training the image_vq tokenizer (VQ-VAE) on %d training images, %d steps (first use only)",
                 len(images), train["steps"])
        t0 = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small convolutions: one thread is 2-4x faster than two on a busy 2-core CPU
        try:
            with torch.random.fork_rng(), torch.enable_grad():
                history = train_vqvae(dec, images, steps=train["steps"], lr=train["lr"],
                                      batch_size=train["batch_size"], seed=train["seed"])
        finally:
            torch.set_num_threads(threads)
        seconds = time.perf_counter() - t0
        mse = reconstruction_error(dec, images)
        log.info("trained the image_vq tokenizer on %d images in %.1f s (reconstruction mse %.4f)", len(images),
                 seconds, mse)
        state = {f"vqmodel.{k}": v.detach().contiguous() for k, v in dec.vqmodel.state_dict().items()}
        path.with_suffix(".json").write_text(json.dumps({"options": opts, "train": train, "seconds": seconds,
                                                         "train_mse": mse, "final_loss": history[-1]}) + "\n")
        save_file(state, str(tmp), metadata={"format": "pt"})

    path.parent.mkdir(parents=True, exist_ok=True)
    return build_once(path, build)
