"""Math tests of the ECT / SCT consistency-tuning loss: the r rule, boundary condition, hand values, STF, dropout."""


import pytest
import torch
from toy_models import ConstantX0

from diffusers_onestep.losses import (
    ConsistencyTuningLoss,
    Denoiser,
    consistency_function,
    ect_r,
    sigma_to_timestep,
)
from diffusers_onestep.models.denoiser import alpha_sigma
from diffusers_onestep.testing_utils import get_dummy_components


def _abar():
    return get_dummy_components()["scheduler"].alphas_cumprod


@pytest.mark.parametrize(
    "t, stage, q, expected",
    [(1.0, 0, 2.0, 0.0), (1.0, 1, 2.0, 1 - (1 + 8 * 0.2689414213699951) / 4), (0.1, 0, 2.0, 0.0), (0.1, 1, 2.0, 0.0),
     (80.0, 0, 2.0, 40.0), (2.0, 3, 2.0, 2.0 * (1 - (1 + 8 * 0.11920292202211755) / 16)),
     (1.0, 1, 4.0, 1.0 * (1 - (1 + 8 * 0.2689414213699951) / 16))],
)  # fmt: skip
def test_ect_r_matches_hand_values(t, stage, q, expected):
    r = ect_r(torch.tensor([t], dtype=torch.float64), stage, q=q)
    assert r.item() == pytest.approx(expected, abs=1e-9)
    assert (ect_r(torch.tensor([t]), stage + 1, q=q) >= r.float()).all()  # the gap t - r shrinks with the stage


def test_sigma_timestep_round_trip_and_interpolation():
    abar = _abar()
    t = torch.tensor([0.0, 3.25, 500.5, 999.0])
    a, s = alpha_sigma(abar, t, 1)
    assert a[1] ** 2 == pytest.approx(0.75 * abar[3].item() + 0.25 * abar[4].item(), rel=1e-6)
    assert torch.allclose(sigma_to_timestep(abar, (s / a).flatten()), t, atol=5e-2)  # log-sigma vs abar interpolation


@pytest.mark.parametrize("parametrization", ["ddim", "ect"])
def test_boundary_condition_is_exact(parametrization):
    components = get_dummy_components()
    denoiser = Denoiser.from_scheduler(components["unet"], components["scheduler"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    t_min = torch.zeros(2)
    a_min, s_min = alpha_sigma(denoiser.alphas_cumprod, t_min)
    sigma_min = (s_min / a_min).flatten()[0].item()
    f = consistency_function(denoiser, x, t_min, cond, sigma_min, parametrization)
    assert torch.equal(f, x / a_min)  # f(y, sigma_min) = y in the EDM variable y = x_t / a_t
    f_late = consistency_function(denoiser, x, torch.full((2,), 700.5), cond, sigma_min, parametrization)
    assert not torch.allclose(f_late, x / a_min)


@pytest.mark.parametrize("target", ["ect", "stf"])
@pytest.mark.parametrize("stage", [0, 3])
def test_zero_loss_for_an_exact_consistency_function(target, stage):
    x0_star = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    denoiser = Denoiser(ConstantX0(x0_star), _abar(), "sample")
    loss_fn = ConsistencyTuningLoss(sigma_min=0.0, target=target, c=0.01)
    loss_fn.stage = stage
    loss, logs = loss_fn(denoiser, x0_star.repeat(6, 1, 1, 1), torch.zeros(6, 3, 32),
                         sigmas=torch.tensor([0.01, 0.1, 0.5, 1.0, 5.0, 14.0]), generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.allclose(loss, torch.zeros(6), atol=1e-5)
    assert (logs["r"] < logs["sigma"]).all()


@pytest.mark.parametrize("c, weighting", [(0.0, "inv_dt"), (0.06, "inv_dt"), (0.06, "snr_plus_k")])
def test_pseudo_huber_and_weighting_match_hand_computation(c, weighting):
    # x0_hat = 0 and sigma_min = 0 make f = 0; with r = 0 the target is x0, so d^2 = |x0|^2
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    denoiser = Denoiser(ConstantX0(torch.zeros(1, 4, 4, 4)), _abar(), "sample")
    loss_fn = ConsistencyTuningLoss(sigma_min=0.0, c=c, weighting=weighting, sigma_data=0.5)
    loss, logs = loss_fn(denoiser, latents, torch.zeros(2, 3, 32), sigmas=torch.tensor([0.3, 2.0]),
                         r_sigmas=torch.zeros(2))  # fmt: skip
    t = logs["sigma"]
    assert torch.allclose(t, torch.tensor([0.3, 2.0]), rtol=1e-2)
    distance = (latents.flatten(1).pow(2).sum(1) + c**2).sqrt() - c
    weight = 1 / t if weighting == "inv_dt" else (t**2 + 0.25) / (t * 0.5) ** 2
    assert torch.allclose(loss, distance * weight, rtol=1e-5)


def test_stf_with_one_reference_equals_the_single_sample_target():
    components = get_dummy_components()
    denoiser = Denoiser.from_scheduler(components["unet"], components["scheduler"])
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(3, 3, 32, generator=torch.Generator().manual_seed(1))
    kwargs = {"sigmas": torch.tensor([0.2, 1.0, 6.0]), "noise": torch.randn(3, 4, 8, 8)}
    ect, _ = ConsistencyTuningLoss(target="ect")(denoiser, latents, cond, **kwargs)
    # every sample is alone in its group: the STF estimate is the sample's own eps
    stf, _ = ConsistencyTuningLoss(target="stf")(denoiser, latents, cond, group=torch.arange(3), **kwargs)
    assert torch.allclose(stf, ect, rtol=1e-4, atol=1e-5)
    a, s = alpha_sigma(denoiser.alphas_cumprod, torch.tensor([10.0, 300.0, 900.0]))
    x_t = a * latents + s * kwargs["noise"]
    eps = ConsistencyTuningLoss.stf_eps(x_t, a, s, torch.arange(3), latents=latents)
    assert torch.allclose(eps, kwargs["noise"], atol=1e-4)
    # a shared group mixes references: the estimate changes, and only within the group
    a, s = alpha_sigma(denoiser.alphas_cumprod, torch.full((3,), 999.0))
    x_t = a * latents + s * kwargs["noise"]
    mixed = ConsistencyTuningLoss.stf_eps(x_t, a, s, torch.tensor([0, 0, 1]), latents=latents)
    assert torch.allclose(mixed[2], kwargs["noise"][2], atol=1e-4)
    assert not torch.allclose(mixed[1], kwargs["noise"][1], atol=1e-2)


def test_shared_dropout_mask_and_gradients():
    x0_star = torch.ones(1, 4, 4, 4)
    net = ConstantX0(x0_star, dropout=0.5).train()
    denoiser = Denoiser(net, _abar(), "sample")
    masks = []
    net.drop.register_forward_hook(lambda module, inputs, output: masks.append(output != 0))
    loss_fn = ConsistencyTuningLoss(sigma_min=0.0)
    loss_fn.stage = 5  # r > 0 everywhere: the target is a network evaluation
    torch.manual_seed(0)
    loss, _ = loss_fn(denoiser, x0_star.repeat(4, 1, 1, 1), torch.zeros(4, 3, 32),
                      sigmas=torch.tensor([0.5, 1.0, 2.0, 4.0]))  # fmt: skip
    assert len(masks) == 2 and torch.equal(masks[0], masks[1]) and not masks[0].all()
    assert torch.allclose(loss, torch.zeros(4), atol=1e-5)  # same mask: student and target agree
    loss = ConsistencyTuningLoss(sigma_min=0.0, c=0.1)(denoiser, torch.zeros(2, 4, 4, 4), torch.zeros(2, 3, 32))[0]
    loss.mean().backward()
    assert net.scale.grad is not None and torch.isfinite(net.scale.grad)


def test_unet_loss_is_finite_and_deterministic():
    components = get_dummy_components()
    denoiser = Denoiser.from_scheduler(components["unet"], components["scheduler"])
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    loss_fn = ConsistencyTuningLoss(c=0.06, target="stf")
    first, _ = loss_fn(denoiser, latents, cond, group=torch.tensor([0, 0]), generator=torch.Generator().manual_seed(2))
    second, _ = loss_fn(denoiser, latents, cond, group=torch.tensor([0, 0]), generator=torch.Generator().manual_seed(2))
    assert first.shape == (2,) and torch.isfinite(first).all() and torch.equal(first, second)
    first.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in components["unet"].parameters() if p.grad is not None)
