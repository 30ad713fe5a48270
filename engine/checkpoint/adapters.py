"""State-dict adapters: one per model family, mapping a released checkpoint's tensor names
to ours and back (in the manner of torchtitan's state-dict adapters). Import, `init_from`,
`engine.load_pretrained` and export all go through the family's adapter, so a name is
translated in one place.

- `TextAdapter` (Llama, Qwen2, Qwen3, Qwen3-MoE): ours are Hugging Face's without `model.`
  and with `blocks.` for `layers.` (Qwen3-MoE's per-expert tensors are stacked by hf.py).
- `Qwen2VLAdapter` (Qwen2-VL, Qwen2.5-VL, Qwen2.5-Omni's thinker and whole model: one per row
  of `qwen2_vl.FAMILIES`): the backbone under `backbone.`, the vision tower under
  `encoders.<part>.` (`vision`, `qwen2_5_vision`), Qwen2.5-Omni's audio tower under
  `encoders.qwen2_5_omni_audio.`; reads the released naming (`model.layers.*`, `visual.*`,
  `audio_tower.*`) and transformers 5's in-memory one (`model.language_model.*`,
  `model.visual.*`, `model.audio_tower.*`), writes the naming it is given; a whole
  Qwen2.5-Omni's are under `thinker.` (its other tensors map to None: not ours).
  Not one to one for Qwen2.5-Omni's vision tower: its separate `attn.q/k/v` tensors are one
  of our `attn.qkv` (from_hf maps each of them to it; `hf_names` gives the three, in the
  order they stack; `to_hf` raises for it).
- `janus.JanusFamily` (Janus): the siglip encoder part, the LLaMA backbone and the image_vq
  decoder part (engine/checkpoint/janus.py).
"""

from __future__ import annotations

from typing import Optional, Protocol

from . import janus, qwen2_vl


class StateDictAdapter(Protocol):
    architectures: tuple[str, ...]

    def from_hf(self, name: str) -> Optional[str]:
        """Our parameter name for a checkpoint tensor (None: not a parameter, e.g. inv_freq)."""

    def to_hf(self, name: str) -> str:
        """The checkpoint's tensor name for one of our parameters."""


class TextAdapter:
    architectures = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")

    def from_hf(self, name: str) -> Optional[str]:
        if name.endswith("rotary_emb.inv_freq"):
            return None
        if name.startswith("model.layers."):
            return "blocks." + name[len("model.layers."):]
        if name.startswith("model."):
            return name[len("model."):]
        return name  # lm_head.weight

    def to_hf(self, name: str) -> str:
        if name.startswith("blocks."):
            return "model.layers." + name[len("blocks."):]
        if name.startswith("lm_head."):
            return name
        return "model." + name


class Qwen2VLAdapter:
    """A Qwen2-VL-family architecture's adapter (Qwen2-VL unless `architecture` names another)."""

    def __init__(self, layout: str = "released", architecture: str = qwen2_vl.ARCHITECTURE):
        self.family = qwen2_vl.FAMILIES[architecture]
        self.architectures = (architecture,)
        self.layout = layout

    def from_hf(self, name: str) -> Optional[str]:
        return self.family.from_hf(name)

    def to_hf(self, name: str) -> str:
        return self.family.to_hf(name, self.layout)

    def hf_names(self, name: str) -> tuple[str, ...]:
        """The checkpoint's tensors of one of our parameters, in the order they stack (dim 0)."""
        return self.family.hf_names(name, self.layout)


TEXT = TextAdapter()
ADAPTERS: dict[str, StateDictAdapter] = {**{a: TEXT for a in TextAdapter.architectures},
                                         **{a: Qwen2VLAdapter(architecture=a) for a in qwen2_vl.FAMILIES},
                                         janus.ARCHITECTURE: janus.JanusFamily()}


def adapter_for(architecture: str) -> StateDictAdapter:
    """The adapter of a `config.json` architecture (KeyError for an unsupported one: callers
    check the architecture first and name the supported ones)."""
    return ADAPTERS[architecture]
