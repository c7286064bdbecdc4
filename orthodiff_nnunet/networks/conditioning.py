"""Timestep conditioning of an unmodified dynamic-network-architectures U-Net.

The plans' network (PlainConvUNet or ResidualEncoderUNet) is used as the denoiser as it is: a
sinusoidal timestep embedding goes through a small MLP, and per stage a zero-initialised linear
layer turns it into a scale and a shift applied to that stage's output (FiLM,
``h * (1 + scale) + shift``) through forward hooks. Nothing in dynamic-network-architectures is
edited, and the wrapped network's parameter names are unchanged, so its encoder weights
transfer to the segmentation network key by key.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style embedding of (B,) timesteps -> (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def _stage_channels(stage: nn.Module) -> int:
    """Output channels of a stage: the last conv's out_channels."""
    convs = [m for m in stage.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise ValueError(f"stage {type(stage).__name__} has no convolution")
    return convs[-1].out_channels


class TimestepConditionedNetwork(nn.Module):
    """Wraps a U-Net ``network`` (with ``encoder.stages`` and ``decoder.stages``) as a denoiser.

    Args:
        network: the plans' network, built with as many outputs as input channels.
        embed_dim: width of the timestep embedding.
        condition_decoder: also condition the decoder stages (default True).

    Call as ``model(x_t, t)``.
    """

    def __init__(self, network: nn.Module, embed_dim: int = 128, condition_decoder: bool = True) -> None:
        super().__init__()
        self.network = network
        self.embed_dim = embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, 4 * embed_dim))
        stages: list[nn.Module] = list(network.encoder.stages)
        if condition_decoder:
            stages += list(network.decoder.stages)
        self.film = nn.ModuleList()
        self._hooks = []
        for stage in stages:
            lin = nn.Linear(4 * embed_dim, 2 * _stage_channels(stage))
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)  # identity at initialisation: the plain network's behaviour
            self.film.append(lin)
            self._hooks.append(stage.register_forward_hook(self._make_hook(len(self.film) - 1)))
        self._emb: torch.Tensor | None = None

    def _make_hook(self, index: int):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
            if self._emb is None:
                raise RuntimeError("call the conditioned network as model(x, t)")
            scale, shift = self.film[index](self._emb).to(output.dtype).chunk(2, dim=1)
            shape = (output.shape[0], -1) + (1,) * (output.ndim - 2)
            return output * (1 + scale.reshape(shape)) + shift.reshape(shape)

        return hook

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._emb = self.time_mlp(sinusoidal_embedding(t, self.embed_dim))
        try:
            return self.network(x)
        finally:
            self._emb = None
