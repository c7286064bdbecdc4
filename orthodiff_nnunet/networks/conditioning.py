"""Timestep conditioning of an unmodified dynamic-network-architectures U-Net.

The plans' network (PlainConvUNet or ResidualEncoderUNet) is used as the denoiser as it is: a
sinusoidal timestep embedding goes through a small MLP, and per stage a zero-initialised linear
layer turns it into a scale and a shift applied to that stage's output (FiLM,
``h * (1 + scale) + shift``) through forward hooks. Nothing in dynamic-network-architectures is
edited, and the wrapped network's parameter names are unchanged, so its encoder weights
transfer to the segmentation network key by key.

The encoder contract (docs/CONTRACTS.md): the pretrained network applied FiLM after every encoder
stage at every ``t``, ``t = 0`` included, so its encoder weights alone describe a network it never
was. The FiLM at a timestep is a constant per-channel affine per stage (it depends on ``t`` only,
not on the image), and it cannot be folded exactly into the weights (it follows the stage's
nonlinearity, and a shift after a convolution's zero padding differs at the borders). So every
consumer's encoder carries it as two buffers per stage, ``film_scale`` and ``film_shift``
(:func:`install_stage_affine`), applied by a forward hook as ``h * (1 + scale) + shift``, the FiLM
hook's arithmetic; zeros (a from-scratch network) are the identity. The buffers belong to the
encoder's state dict, so they travel in ``encoder.pt``, in nnU-Net checkpoints of networks built
with them and in the classifier's, and nnU-Net's predictor rebuilds them through the trainer's
``build_network_architecture``. :class:`EncoderConditioning` (the time MLP and the encoder stages'
FiLM layers, shipped in ``encoder.pt`` too) gives the affine at any other timestep.
"""

from __future__ import annotations

import functools
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


STAGE_SCALE = "film_scale"
STAGE_SHIFT = "film_shift"


def _apply_stage_affine(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a stage with the contract's buffers: ``h * (1 + scale) + shift`` per channel."""
    shape = (1, -1) + (1,) * (output.ndim - 2)
    scale = getattr(module, STAGE_SCALE).to(output.dtype).reshape(shape)
    shift = getattr(module, STAGE_SHIFT).to(output.dtype).reshape(shape)
    return output * (1 + scale) + shift


def _fill_missing_affine(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook: a state dict written without the buffers (an older nnU-Net checkpoint of a network
    trained without them) loads with the identity, which is exactly how that network ran."""
    for name in (STAGE_SCALE, STAGE_SHIFT):
        state_dict.setdefault(prefix + name, torch.zeros_like(getattr(module, name)))


def install_stage_affine(encoder: nn.Module) -> nn.Module:
    """Give every stage of ``encoder`` the contract's per-channel affine (zeros: the identity); idempotent.

    Args:
        encoder: a dynamic-network-architectures encoder (``encoder.stages``).

    Returns:
        ``encoder``, modified in place.
    """
    for stage in encoder.stages:
        if hasattr(stage, STAGE_SCALE):
            continue
        c = _stage_channels(stage)
        stage.register_buffer(STAGE_SCALE, torch.zeros(c))
        stage.register_buffer(STAGE_SHIFT, torch.zeros(c))
        stage.register_forward_hook(_apply_stage_affine)
        stage._register_load_state_dict_pre_hook(_fill_missing_affine, with_module=True)
    return encoder


def has_stage_affine(encoder: nn.Module) -> bool:
    return all(hasattr(s, STAGE_SCALE) for s in encoder.stages)


@torch.no_grad()
def set_stage_affine(encoder: nn.Module, affine: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    """Write per-stage (scale, shift) into the encoder's buffers; None = the identity (zeros)."""
    install_stage_affine(encoder)
    for i, stage in enumerate(encoder.stages):
        scale, shift = getattr(stage, STAGE_SCALE), getattr(stage, STAGE_SHIFT)
        if affine is None:
            scale.zero_()
            shift.zero_()
        else:
            scale.copy_(affine[i][0].reshape(-1))
            shift.copy_(affine[i][1].reshape(-1))


class EncoderConditioning(nn.Module):
    """The time MLP and the encoder stages' FiLM layers of a denoiser: the affine at any timestep.

    Args:
        embed_dim: width of the sinusoidal embedding.
        stage_channels: output channels of each encoder stage.
    """

    def __init__(self, embed_dim: int, stage_channels: list[int]) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.stage_channels = [int(c) for c in stage_channels]
        self.time_mlp = nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, 4 * embed_dim))
        self.film = nn.ModuleList(nn.Linear(4 * embed_dim, 2 * c) for c in stage_channels)

    @torch.no_grad()
    def affine(self, t: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per encoder stage, (scale, shift) of shape (C,) at timestep ``t`` (float32, CPU)."""
        dev = self.time_mlp[0].weight.device
        emb = self.time_mlp(sinusoidal_embedding(torch.tensor([int(t)], device=dev), self.embed_dim))
        out = []
        for lin in self.film:
            scale, shift = lin(emb).chunk(2, dim=1)
            out.append((scale[0].float().cpu(), shift[0].float().cpu()))
        return out

    def to_payload(self) -> dict:
        return {"embed_dim": self.embed_dim, "stage_channels": self.stage_channels,
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}}

    @classmethod
    def from_payload(cls, payload: dict) -> "EncoderConditioning":
        mod = cls(payload["embed_dim"], payload["stage_channels"])
        mod.load_state_dict(payload["state_dict"], strict=True)
        return mod


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
        self.n_encoder_stages = len(stages)
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
        """The forward hook of conditioned stage ``index``: a partial of a bound method, not a closure.

        ``copy.deepcopy`` (``torch.optim.swa_utils.AveragedModel`` deep-copies the denoiser for the
        EMA) rebinds a bound method to the copy, but shares a closure with the original: the copy's
        stages would then apply the original's FiLM and embedding.
        """
        return functools.partial(self._film_hook, index)

    def _film_hook(self, index: int, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if self._emb is None:
            raise RuntimeError("call the conditioned network as model(x, t)")
        scale, shift = self.film[index](self._emb).to(output.dtype).chunk(2, dim=1)
        shape = (output.shape[0], -1) + (1,) * (output.ndim - 2)
        return output * (1 + scale.reshape(shape)) + shift.reshape(shape)

    def encoder_conditioning(self) -> EncoderConditioning:
        """A copy of the time MLP and the encoder stages' FiLM layers (what ``encoder.pt`` ships)."""
        cond = EncoderConditioning(self.embed_dim, [lin.out_features // 2 for lin in self.film[:self.n_encoder_stages]])
        cond.time_mlp.load_state_dict(self.time_mlp.state_dict())
        for dst, src in zip(cond.film, self.film[:self.n_encoder_stages]):
            dst.load_state_dict(src.state_dict())
        return cond.to("cpu").float()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._emb = self.time_mlp(sinusoidal_embedding(t, self.embed_dim))
        try:
            return self.network(x)
        finally:
            self._emb = None
