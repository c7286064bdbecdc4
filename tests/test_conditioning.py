"""Timestep conditioning of unmodified PlainConvUNet / ResidualEncoderUNet."""

from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from orthodiff_nnunet.networks.conditioning import TimestepConditionedNetwork, sinusoidal_embedding


def tiny(cls, dim=3):
    conv = nn.Conv3d if dim == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if dim == 3 else nn.InstanceNorm2d
    kw = dict(input_channels=1, n_stages=3, features_per_stage=[4, 8, 16], conv_op=conv, kernel_sizes=3,
              strides=[1, 2, 2], num_classes=1, n_conv_per_stage_decoder=1, conv_bias=True, norm_op=norm,
              norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    if cls is PlainConvUNet:
        return cls(n_conv_per_stage=1, **kw)
    return cls(n_blocks_per_stage=1, **kw)


@pytest.mark.parametrize("cls", [PlainConvUNet, ResidualEncoderUNet])
@pytest.mark.parametrize("dim", [2, 3])
def test_identity_at_init_then_depends_on_t(cls, dim):
    torch.manual_seed(0)
    net = tiny(cls, dim).eval()
    x = torch.randn(2, 1, *([16] * dim))
    plain = net(x)
    model = TimestepConditionedNetwork(net, embed_dim=16).eval()
    t = torch.tensor([3, 900])
    assert torch.allclose(model(x, t), plain, atol=1e-6)  # zero-initialised FiLM = the plain network
    for lin in model.film:
        nn.init.normal_(lin.weight, std=0.05)
    a, b = model(x, torch.tensor([3, 3])), model(x, torch.tensor([900, 900]))
    assert a.shape == plain.shape
    assert (a - b).abs().mean() > 1e-3
    # per-sample conditioning: sample 0 sees t=3, sample 1 t=900
    mixed = model(x, t)
    assert torch.allclose(mixed[0], a[0], atol=1e-5) and torch.allclose(mixed[1], b[1], atol=1e-5)


def test_parameter_names_of_the_wrapped_network_are_unchanged_and_trained():
    net = tiny(PlainConvUNet)
    keys = set(net.state_dict())
    model = TimestepConditionedNetwork(net, embed_dim=8)
    wrapped = {k[len("network."):] for k in model.state_dict() if k.startswith("network.")}
    assert wrapped == keys
    assert len(model.film) == len(net.encoder.stages) + len(net.decoder.stages)
    x, t = torch.randn(2, 1, 16, 16, 16), torch.tensor([1, 2])
    model(x, t).pow(2).mean().backward()
    assert model.film[0].weight.grad is not None and model.film[0].weight.grad.abs().sum() > 0
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad is not None


def test_calling_without_t_is_an_error():
    model = TimestepConditionedNetwork(tiny(PlainConvUNet), embed_dim=8)
    with pytest.raises(RuntimeError, match=r"model\(x, t\)"):
        model.network(torch.randn(1, 1, 16, 16, 16))


def test_sinusoidal_embedding_known_values():
    e = sinusoidal_embedding(torch.tensor([0, 1]), 4)
    assert e.shape == (2, 4)
    assert torch.allclose(e[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    # frequencies 1 and 1e-2 for dim 4
    assert torch.allclose(e[1], torch.tensor([torch.cos(torch.tensor(1.0)), torch.cos(torch.tensor(0.01)),
                                              torch.sin(torch.tensor(1.0)), torch.sin(torch.tensor(0.01))]), atol=1e-6)
