"""A modality defined outside engine/: one file, one decorator (see README, "Adding a modality")."""

import torch
import torch.nn as nn

from engine.modalities import Encoder, register_encoder


@register_encoder("toy_sensor")
class ToySensorEncoder(Encoder):
    """Readings [num_readings, channels] -> one embedding per reading."""

    def __init__(self, channels: int = 3, width: int = 16):
        super().__init__()
        self.channels, self.out_dim = channels, width
        self.net = nn.Sequential(nn.Linear(channels, width), nn.GELU(), nn.Linear(width, width))

    def lm_encode(self, payload):
        return self.net(payload["readings"])

    def num_tokens(self, payload):
        return payload["readings"].shape[0]

    def dummy_payload(self, device="cpu"):
        return {"readings": torch.zeros(2, self.channels, device=device)}

    def check_payload(self, payload):
        if payload["readings"].shape[-1] != self.channels:
            raise ValueError(f"toy_sensor: readings have {payload['readings'].shape[-1]} channels, "
                             f"expected {self.channels}")
