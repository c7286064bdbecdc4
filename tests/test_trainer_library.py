"""The trainers' library parts (torch's AveragedModel EMA, nnU-Net's warm-up and poly schedulers) give the
numbers of the hand-written code they replaced; old checkpoints still load; the denoiser deep-copies."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from orthodiff_nnunet.networks.conditioning import TimestepConditionedNetwork
from orthodiff_nnunet.trainers.diffusion_pretraining import DiffusionModel
from orthodiff_nnunet.trainers.segmentation import WarmupPolyLRScheduler


def _denoiser() -> TimestepConditionedNetwork:
    net = PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 1, (1, 1), False,
                        torch.nn.InstanceNorm3d, {"affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True})
    return TimestepConditionedNetwork(net, embed_dim=8)


class _HandWrittenEMA:
    """The update the trainer used before AveragedModel (reference, kept here only)."""

    def __init__(self, denoiser: torch.nn.Module, decay: float) -> None:
        self.ema = copy.deepcopy(denoiser).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, denoiser: torch.nn.Module) -> None:
        torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in denoiser.parameters()], 1.0 - self.decay)
        for e, c in zip(self.ema.buffers(), denoiser.buffers()):
            e.copy_(c)


def _train(model: DiffusionModel, steps: int, reference: _HandWrittenEMA | None = None) -> None:
    opt = torch.optim.AdamW([p for p in model.denoiser.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(2, 1, 8, 16, 16, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        opt.zero_grad()
        ((model(x, t) - x) ** 2).mean().backward()
        opt.step()
        model.update_ema()
        if reference is not None:
            reference.update(model.denoiser)


@pytest.mark.parametrize("decay", [0.995, 0.9])
def test_averaged_model_ema_equals_the_hand_written_update_bit_for_bit(decay):
    torch.manual_seed(0)
    model = DiffusionModel(_denoiser)
    model.ema_decay = decay  # as the trainer sets it after building the network
    reference = _HandWrittenEMA(model.denoiser, decay)
    start = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    # W_0^EMA = W_0: the EMA starts as the denoiser
    for k, v in model.ema.state_dict().items():
        assert torch.equal(v, start[k]), k
    _train(model, 7, reference)
    moved = 0
    for (k, v), (k2, w) in zip(model.ema.state_dict().items(), reference.ema.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k
        moved += int(not torch.equal(v, start[k]))
    assert moved > 10  # the EMA did move (the test compares trained weights, not the initial ones)
    assert int(model.ema_model.n_averaged) == 8
    assert not any(p.requires_grad for p in model.ema.parameters())
    # the EMA lags the denoiser: closer to the start than the trained weights are
    key = "network.encoder.stages.0.0.convs.0.conv.weight"
    ema_w, den_w = model.ema.state_dict()[key], model.denoiser.state_dict()[key]
    assert 0 < (ema_w - start[key]).norm() < (den_w - start[key]).norm()


def test_building_draws_the_random_numbers_of_two_denoisers_as_before():
    torch.manual_seed(5)
    _denoiser(), _denoiser()
    expected = torch.get_rng_state()
    torch.manual_seed(5)
    DiffusionModel(_denoiser)
    assert torch.equal(torch.get_rng_state(), expected)  # a seeded run draws the same patches and noise


def test_checkpoint_of_the_hand_written_ema_layout_loads_and_continues():
    torch.manual_seed(1)
    model = DiffusionModel(_denoiser)
    _train(model, 3)
    new_layout = model.state_dict()
    assert "ema_model.n_averaged" in new_layout and not any(k.startswith("ema.") for k in new_layout)
    old_layout = {k.replace("ema_model.module.", "ema."): v.clone() for k, v in new_layout.items()
                  if k != "ema_model.n_averaged"}
    torch.manual_seed(2)
    resumed = DiffusionModel(_denoiser)
    resumed.load_state_dict(old_layout, strict=True)
    for k, v in model.state_dict().items():
        if k != "ema_model.n_averaged":
            assert torch.equal(resumed.state_dict()[k], v), k
    assert int(resumed.ema_model.n_averaged) >= 1  # averaging continues, it does not restart from a copy
    before = {k: v.clone() for k, v in resumed.ema.state_dict().items()}
    _train(resumed, 1)
    changed = [k for k, v in resumed.ema.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and not all(torch.equal(resumed.ema.state_dict()[k], resumed.denoiser.state_dict()[k])
                               for k in changed)


def test_a_deep_copy_of_the_conditioned_network_uses_its_own_film_layers():
    torch.manual_seed(0)
    net = _denoiser()
    dup = copy.deepcopy(net)
    x, t = torch.randn(1, 1, 8, 16, 16), torch.tensor([400])
    with torch.no_grad():
        assert torch.equal(net(x, t), dup(x, t))
        for p in dup.film.parameters():
            p.add_(0.5)
        assert not torch.equal(net(x, t), dup(x, t))
        net.load_state_dict(dup.state_dict())
        assert torch.equal(net(x, t), dup(x, t))


# -- learning rate --------------------------------------------------------------------------------

def _hand_written_lr(step: int, initial_lr: float, max_steps: int, warmup: int, exponent: float = 0.9) -> float:
    """The schedule before nnU-Net's warm-up schedulers (reference)."""
    if step < warmup:
        return initial_lr * (step + 1) / (warmup + 1)
    return initial_lr * max(0.0, 1 - (step - warmup) / (max_steps - warmup)) ** exponent


@pytest.mark.parametrize("max_steps,warmup", [(10, 3), (1000, 50), (7, 0), (2, 1), (300, 15)])
def test_warmup_poly_schedule_per_epoch_equals_the_hand_written_one(max_steps, warmup):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupPolyLRScheduler(opt, 1e-2, max_steps, warmup)
    got, want = [], []
    for epoch in range(max_steps):
        sched.step(epoch)  # how nnU-Net's on_train_epoch_start steps it
        got.append(opt.param_groups[0]["lr"])
        assert sched.get_last_lr() == [got[-1]]
        want.append(_hand_written_lr(epoch, 1e-2, max_steps, warmup))
    # the warm-up computes initial_lr / (W + 1) * (s + 1) instead of initial_lr * (s + 1) / (W + 1): <= 1 ulp apart
    np.testing.assert_allclose(got, want, rtol=2.3e-16, atol=0)
    assert got[warmup:] == want[warmup:]  # the poly decay is the same expression
    if warmup:
        assert max(got[:warmup]) < 1e-2 and got[warmup] == 1e-2


def test_schedule_resumed_at_an_epoch_gives_the_uninterrupted_rate():
    """A resumed trainer builds a fresh scheduler and steps it at the checkpoint's epoch."""
    lrs = []
    for epoch in (0, 4, 5, 9):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        WarmupPolyLRScheduler(opt, 1e-2, 10, 5).step(epoch)
        lrs.append(opt.param_groups[0]["lr"])
    uninterrupted = [_hand_written_lr(e, 1e-2, 10, 5) for e in (0, 4, 5, 9)]
    np.testing.assert_allclose(lrs, uninterrupted, rtol=2.3e-16, atol=0)
    # stepped without an epoch it counts on from its construction (which sets epoch 0), as nnU-Net's do
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupPolyLRScheduler(opt, 1e-2, 10, 5)
    seq = [opt.param_groups[0]["lr"]]
    for _ in range(9):
        s.step()
        seq.append(opt.param_groups[0]["lr"])
    np.testing.assert_allclose(seq, [_hand_written_lr(e, 1e-2, 10, 5) for e in range(10)], rtol=2.3e-16, atol=0)


def test_warmup_not_shorter_than_the_run_is_refused():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warm-up of 10 epochs must be shorter than the 10 epochs"):
        WarmupPolyLRScheduler(opt, 1e-2, 10, 10)


# -- noise schedules: the pure module against MONAI (orthodiff_nnunet/diffusion/schedules.py says why it stays) --

@pytest.mark.parametrize("name,monai_kwargs", [("cosine", {"schedule": "cosine"}),
                                               ("linear", {"schedule": "linear_beta", "beta_start": 1e-4,
                                                           "beta_end": 0.02})])
def test_schedules_and_forward_process_agree_with_monai_ddpm(name, monai_kwargs):
    from monai.networks.schedulers import DDPMScheduler

    from orthodiff_nnunet.diffusion import make_schedule, q_sample, training_target

    ours, theirs = make_schedule(name, 1000), DDPMScheduler(1000, **monai_kwargs)
    assert (ours.alphas_cumprod - theirs.alphas_cumprod).abs().max().item() < 5e-7
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1000, 1, 64, generator=g), torch.randn(1000, 1, 64, generator=g)
    t = torch.arange(1000)
    # x_t and v at every t: MONAI's float32 sqrt(1 - abar) makes the few-1e-6 differences
    assert (q_sample(ours, x0, t, noise) - theirs.add_noise(x0, noise, t)).abs().max().item() < 3e-5
    assert (training_target(ours, x0, t, noise, "v") - theirs.get_velocity(x0, noise, t)).abs().max().item() < 3e-5
    # MONAI 1.6.1's add_noise casts its stored schedule to a float16 input (bench/results/noise_schedule.md); ours not
    q_sample(ours, x0[:1].half(), t[:1], noise[:1].half())
    assert ours.alphas_cumprod.dtype == torch.float32
