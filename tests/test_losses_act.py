"""Math tests of ACT (losses/act.py): the grid, N(k) and mu(k), lambda's schedule, pseudo-Huber, hand-computed G and D
losses, R1 against an autograd check, lambda = 0 as exactly plain consistency training; the discriminator module."""

import math

import pytest
import torch
import torch.nn.functional as F
from toy_models import ConstantX0, ToyUNet

from diffusers_onestep.losses import (
    ACTLoss,
    Denoiser,
    adversarial_weights,
    consistency_function,
    ct_bins,
    ct_ema_decay,
    karras_sigmas,
    pseudo_huber,
)
from diffusers_onestep.models import LatentDiscriminator, pooled_text
from diffusers_onestep.models.denoiser import alpha_sigma
from diffusers_onestep.testing_utils import get_dummy_components


class LinearD(torch.nn.Module):
    """`D(x, t, c) = <w, x> + u t + <v, c>`: its gradient in `x` is `w`, so R1 is `gamma / 2 |w|^2` by hand."""

    def __init__(self, shape, text_dim=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(shape, generator=g))
        self.u = torch.nn.Parameter(torch.tensor(0.001))
        self.v = torch.nn.Parameter(torch.randn(text_dim, generator=g))

    def forward(self, x, t, c):
        return (x * self.w).flatten(1).sum(1) + self.u * t + c @ self.v


def _abar():
    return get_dummy_components()["scheduler"].alphas_cumprod


def test_karras_grid_curriculum_and_ema_decay_match_the_official_formulas():
    sigmas = karras_sigmas(3, 0.002, 80.0, 7.0)
    mid = (0.002 ** (1 / 7) + 0.5 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    torch.testing.assert_close(sigmas, torch.tensor([0.002, mid, 80.0], dtype=torch.float64))
    assert [ct_bins(k, 1000) for k in (0, 500, 1000)] == [2, round(math.sqrt(0.5 * (150**2 - 4) + 4)), 150]
    assert ct_bins(500, 1000) == 106
    assert ct_ema_decay(2) == pytest.approx(0.81) and ct_ema_decay(150) == pytest.approx(0.9 ** (2 / 149))
    assert ct_ema_decay(150) == pytest.approx(0.99859, abs=1e-5)


def test_adversarial_weight_schedule_hits_lambda_at_the_top_and_mid_weight_at_the_middle():
    index = torch.tensor([0, 50, 100])
    torch.testing.assert_close(adversarial_weights(index, 101, 0.3), torch.full((3,), 0.3))
    weights = adversarial_weights(index, 101, 0.6, 0.2)
    torch.testing.assert_close(weights, torch.tensor([0.0, 0.2, 0.6]))


def test_pseudo_huber_by_hand():
    a, b = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    torch.testing.assert_close(pseudo_huber(a, b, 0.0), torch.tensor([5.0]))
    torch.testing.assert_close(pseudo_huber(a, b, 1.0), torch.tensor([math.sqrt(26) - 1]))
    c = 0.00054 * math.sqrt(2)  # iCT's default
    torch.testing.assert_close(pseudo_huber(a, b), torch.tensor([math.sqrt(25 + c * c) - c]))


def test_grid_spans_the_schedule_and_the_first_point_is_the_exact_boundary():
    abar, loss = _abar(), ACTLoss()
    sigmas, timesteps, sigma_min = loss.grid(abar, 5)
    torch.testing.assert_close(timesteps[[0, -1]], torch.tensor([0.0, len(abar) - 1.0]))
    assert sigma_min == pytest.approx(float(sigmas[0]), rel=1e-5)
    denoiser = Denoiser(ToyUNet(0.7, 0.0), abar)
    x, cond = torch.randn(2, 4, 4, 4), torch.zeros(2, 3, 5)
    f, t = loss.consistency(denoiser, x, cond, bins=5, indices=torch.tensor([0, 0]), noise=torch.zeros_like(x))
    a, _ = alpha_sigma(abar, timesteps[:1], 4)
    torch.testing.assert_close(f, (a * x) / a, rtol=0, atol=0)  # f(x_0, t_0) = x_0 / a_0 with x_0 = a_0 x0: x0
    assert t.tolist() == [0.0, 0.0]


def test_generator_loss_by_hand_and_lambda_zero_is_exactly_plain_ct():
    abar = _abar()
    x0, noise = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    cond, text, bins, index = torch.randn(3, 5, 6), torch.randn(3, 3), 10, torch.tensor([1, 5, 9])
    student, ema = Denoiser(ToyUNet(0.5, 0.2), abar), Denoiser(ToyUNet(0.4, 0.1), abar)
    d = LinearD((4, 4, 4))
    loss_fn = ACTLoss(adversarial_weight=0.3, huber_c=0.0)
    target, t_prev = loss_fn.consistency(ema, x0, cond, bins=bins, indices=index - 1, noise=noise)
    loss, logs = loss_fn.generator_loss(student, d, x0, cond, text, target, bins=bins, indices=index, noise=noise)
    # by hand: x_{n+1}, f online, L2 distance, the discriminator's logit of f
    _, timesteps, sigma_min = loss_fn.grid(abar, bins)
    a, s = alpha_sigma(abar, timesteps[index], 4)
    f = consistency_function(student, a * x0 + s * noise, timesteps[index], cond, sigma_min)
    ct = (f - target).flatten(1).norm(dim=1)
    adv = F.softplus(-d(f, timesteps[index], text))
    torch.testing.assert_close(loss, 0.7 * ct + 0.3 * adv)
    torch.testing.assert_close(logs["loss_ct"], ct.mean())
    torch.testing.assert_close(t_prev, timesteps[index - 1])
    # lambda 0: exactly plain CT, with or without a discriminator
    plain = ACTLoss(adversarial_weight=0.0, huber_c=0.0)
    with_d, _ = plain.generator_loss(student, d, x0, cond, text, target, bins=bins, indices=index, noise=noise)
    without, _ = plain.generator_loss(student, None, x0, cond, text, target, bins=bins, indices=index, noise=noise)
    assert torch.equal(with_d, ct) and torch.equal(without, ct)
    with pytest.raises(ValueError, match="discriminator"):
        loss_fn.generator_loss(student, None, x0, cond, text, target, bins=bins, indices=index, noise=noise)


def test_the_adversarial_gradient_reaches_the_student_through_the_discriminator():
    abar, x0 = _abar(), torch.randn(2, 4, 4, 4)
    unet = ToyUNet(0.5, 0.0)
    student, d = Denoiser(unet, abar), LinearD((4, 4, 4))
    loss_fn = ACTLoss(adversarial_weight=1.0)  # only the adversarial term
    target = torch.zeros_like(x0)
    loss, _ = loss_fn.generator_loss(student, d, x0, torch.zeros(2, 3, 3), torch.zeros(2, 3), target, bins=4,
                                     indices=torch.tensor([3, 3]), noise=torch.zeros_like(x0))  # fmt: skip
    loss.sum().backward()
    assert unet.c.grad is not None and unet.c.grad != 0


@pytest.mark.parametrize("mid_weight", [None, 0.2])
def test_discriminator_loss_by_hand_and_r1_equals_an_autograd_check(mid_weight):
    abar, bins = _abar(), 11
    lam = 0.6 if mid_weight else 0.3
    loss_fn = ACTLoss(adversarial_weight=lam, mid_weight=mid_weight, r1_gamma=10.0)
    d = LinearD((4, 4, 4))
    fake, real = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    fake_i, real_i = torch.tensor([1, 5, 10]), torch.tensor([10, 2, 5])
    text_f, text_r = torch.randn(3, 3), torch.randn(3, 3)
    _, timesteps, _ = loss_fn.grid(abar, bins)
    w_f = adversarial_weights(fake_i, bins, lam, mid_weight) / lam
    w_r = adversarial_weights(real_i, bins, lam, mid_weight) / lam
    expected = (w_f * F.softplus(d(fake, timesteps[fake_i], text_f))).mean() + (
        w_r * F.softplus(-d(real, timesteps[real_i], text_r))
    ).mean()  # fmt: skip
    loss, logs = loss_fn.discriminator_loss(d, fake, fake_i, text_f, real, real_i, text_r, bins=bins,
                                            alphas_cumprod=abar, r1=False)  # fmt: skip
    torch.testing.assert_close(loss, lam * expected)
    with_r1, logs = loss_fn.discriminator_loss(d, fake, fake_i, text_f, real, real_i, text_r, bins=bins,
                                               alphas_cumprod=abar, r1=True)  # fmt: skip
    # R1 of a linear D: grad_x D = w for every sample, so (gamma / 2) mean_i w_i |w|^2
    r1 = 5.0 * (w_r * d.w.detach().pow(2).sum()).mean()
    torch.testing.assert_close(logs["r1"], r1)
    torch.testing.assert_close(with_r1, lam * (expected + r1))
    # and R1 from autograd on a real (nonlinear) discriminator matches a hand-rolled double backward
    net = LatentDiscriminator(in_channels=4, text_embed_dim=3, block_out_channels=(8, 8), layers_per_block=1,
                              norm_num_groups=4, attention_head_dim=4)  # fmt: skip
    _, logs = loss_fn.discriminator_loss(net, fake, fake_i, text_f, real, real_i, text_r, bins=bins,
                                         alphas_cumprod=abar, r1=True)  # fmt: skip
    x = real.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x, timesteps[real_i], text_r).sum(), x)
    torch.testing.assert_close(logs["r1"], 5.0 * (w_r * grad.flatten(1).pow(2).sum(1)).mean())


def test_discriminator_r1_is_twice_differentiable_and_d_mirrors_the_teacher_encoder():
    unet = get_dummy_components()["unet"]
    d = LatentDiscriminator.for_network(unet, text_embed_dim=32)
    assert d.config.block_out_channels == tuple(unet.config.block_out_channels)
    assert [type(b).__name__ for b in d.down_blocks] == [
        "AttnDownBlock2D" if "CrossAttn" in t else "DownBlock2D" for t in unet.config.down_block_types
    ]
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    logits = d(x, torch.tensor([3.5, 900.0]), torch.randn(2, 32))
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    grad.pow(2).sum().backward()
    assert logits.shape == (2,)
    # the penalty reaches D's weights (biases of the head cannot change grad_x D, so they get no gradient)
    assert d.conv_in.weight.grad.abs().sum() > 0 and d.to_logit.weight.grad.abs().sum() > 0


def test_pooled_text_uses_sdxl_pooled_embeddings_or_the_masked_token_mean():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    torch.testing.assert_close(pooled_text({"encoder_hidden_states": hidden}), hidden.mean(1))
    masked = {"encoder_hidden_states": hidden, "encoder_attention_mask": torch.tensor([[1, 1, 0]])}
    torch.testing.assert_close(pooled_text(masked), torch.tensor([[2.0, 3.0]]))
    pooled = torch.randn(1, 5)
    assert torch.equal(pooled_text({"encoder_hidden_states": hidden, "text_embeds": pooled}), pooled)


def test_ct_target_is_the_ema_at_the_previous_point_with_the_same_noise():
    """With the exact denoiser of a one-point data set, f(x_n) = f(x_{n+1}) = x0*: zero CT loss at every point."""
    abar, x0 = _abar(), torch.randn(1, 4, 4, 4).expand(3, -1, -1, -1).contiguous()
    exact = Denoiser(ConstantX0(x0[:1]), abar, "sample")
    loss_fn, noise, index = ACTLoss(adversarial_weight=0.0, huber_c=0.0), torch.randn(3, 4, 4, 4), torch.tensor([1, 4, 7])
    target, _ = loss_fn.consistency(exact, x0, None, bins=8, indices=index - 1, noise=noise)
    loss, _ = loss_fn.generator_loss(exact, None, x0, None, None, target, bins=8, indices=index, noise=noise)
    torch.testing.assert_close(loss, torch.zeros(3), atol=2e-5, rtol=0)


def test_discriminator_attention_only_where_the_latents_are_at_most_16_wide():
    unet = get_dummy_components()["unet"]
    kinds = list(unet.config.down_block_types)
    assert any("CrossAttn" in k for k in kinds)
    small = LatentDiscriminator.for_network(unet, 32, latent_size=8)
    assert [type(b).__name__ for b in small.down_blocks] == [
        "AttnDownBlock2D" if "CrossAttn" in k else "DownBlock2D" for k in kinds
    ]
    large = LatentDiscriminator.for_network(unet, 32, latent_size=128)  # every level wider than 16: no attention
    assert {type(b).__name__ for b in large.down_blocks} == {"DownBlock2D"}
    with pytest.raises(ValueError, match="mid_weight"):
        ACTLoss(adversarial_weight=0.3, mid_weight=0.5)
