"""Math tests of the SiD / SiD-LSG losses: hand computations, identities, gradient routing, non-finite masking."""

import pytest
import torch
from diffusers import DDPMScheduler
from toy_models import ToyUNet

from diffusers_onestep.losses import Denoiser, SiDLoss, student_generate
from diffusers_onestep.schedulers import ConsistencyStudentScheduler
from diffusers_onestep.testing_utils import get_dummy_components


ABAR = torch.linspace(0.99, 0.01, 1000)


def _ab(timesteps):
    abar = ABAR[timesteps].reshape(-1, 1, 1, 1)
    return abar.sqrt(), (1 - abar).sqrt()


def _toy_inputs(batch=3):
    x_g = torch.randn(batch, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(batch, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    return x_g, noise, torch.tensor([20, 500, 979][:batch]), torch.full((batch, 3, 4), 0.3), torch.zeros(1, 3, 4)


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_generator_loss_matches_hand_computation(alpha):
    teacher, fake = ToyUNet(0.5, 1.0), ToyUNet(0.2, 0.5)
    k_teacher, k_fake = 3.0, 2.0
    x_g, noise, timesteps, cond, uncond = _toy_inputs()
    x_g.requires_grad_(True)
    loss_fn = SiDLoss(alpha=alpha, guidance_scale_fake=k_fake, guidance_scale_teacher=k_teacher, loss_scaling=2.0)
    loss, logs = loss_fn.generator_loss(
        Denoiser(teacher, ABAR), Denoiser(fake, ABAR), x_g, cond, uncond, noise=noise, timesteps=timesteps
    )

    # by hand: eps(k) = c x_t + k d 0.3 (the empty prompt's offset is 0); x0 = (x_t - s eps) / a
    def hand(x):
        a, s = _ab(timesteps)
        x_t = a * x + s * noise
        y_real = (x_t - s * (0.5 * x_t + k_teacher * 1.0 * 0.3)) / a
        y_fake = (x_t - s * (0.2 * x_t + k_fake * 0.5 * 0.3)) / a
        w = (x - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5).detach()
        per_pixel = (y_real - y_fake) * ((y_real - x) - alpha * (y_real - y_fake)) / w
        return 2.0 * per_pixel.sum() / x.shape[0], w

    x_hand = x_g.detach().clone().requires_grad_(True)
    expected, w = hand(x_hand)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logs["weight_factor"], w.mean())
    assert logs["num_nonfinite"] == 0
    # no stop-gradient on y_real / y_fake: the gradient is that of the hand formula with only w detached
    loss.backward()
    expected.backward()
    torch.testing.assert_close(x_g.grad, x_hand.grad)
    assert teacher.c.grad is not None  # the toy's parameters require grad: the caller must freeze them (documented)


def test_fake_score_loss_matches_hand_computation_with_guidance_and_dropout():
    fake = ToyUNet(0.2, 0.5)
    x_g, noise, timesteps, cond, _ = _toy_inputs()
    uncond, mask, k1 = torch.full((1, 3, 4), -1.0), torch.tensor([False, True, False]), 2.5
    x_g.requires_grad_(True)
    loss, logs = SiDLoss(guidance_scale_train_fake=k1).fake_score_loss(
        Denoiser(fake, ABAR), x_g, cond, uncond, noise=noise, timesteps=timesteps, uncond_mask=mask
    )
    a, s = _ab(timesteps)
    x_t = a * x_g.detach() + s * noise
    offset_cond = torch.tensor([0.3, -1.0, 0.3]).reshape(-1, 1, 1, 1)  # sample 1 sees the empty prompt
    eps = 0.2 * x_t + 0.5 * ((1 - k1) * -1.0 + k1 * offset_cond)
    torch.testing.assert_close(loss, ((eps - noise) ** 2).sum() / 3)
    assert logs["num_nonfinite_fake"] == 0
    loss.backward()
    assert x_g.grad is None and fake.c.grad is not None and fake.d.grad is not None


def test_fake_score_eps_loss_equals_official_v_prediction_loss():
    # official (loop L438-441): (v_hat - v)^2 * snr / (snr + 1), v = a eps - s x0; ours: (e_hat - eps)^2
    fake = ToyUNet(0.3, 0.7)
    x_g, noise, timesteps, cond, uncond = _toy_inputs()
    loss, _ = SiDLoss().fake_score_loss(
        Denoiser(fake, ABAR, "v_prediction"), x_g, cond, uncond, noise=noise, timesteps=timesteps
    )
    a, s = _ab(timesteps)
    x_t = a * x_g + s * noise
    v_hat, v = 0.3 * x_t + 0.7 * 0.3, a * noise - s * x_g
    snr = a**2 / s**2
    torch.testing.assert_close(loss, ((v_hat - v) ** 2 * snr / (snr + 1)).sum() / 3)


def test_x0_is_the_ddpm_formula_of_the_official_code():
    # the official y_real / y_fake are DDPMScheduler.step(...).pred_original_sample (sid_sd_util.py L268-272)
    scheduler = get_dummy_components()["scheduler"]
    net = ToyUNet(0.4, 0.0)
    x_t, t = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([20, 979])
    ours = Denoiser.from_scheduler(net, scheduler)(x_t, t, torch.zeros(2, 3, 4)).x0
    official = torch.stack([scheduler.step(0.4 * z, int(k), z).pred_original_sample for z, k in zip(x_t, t)])
    torch.testing.assert_close(ours, official)
    assert isinstance(scheduler, DDPMScheduler) and not scheduler.config.clip_sample


def _scheduler():
    config = get_dummy_components()["scheduler"].config
    return ConsistencyStudentScheduler.from_config(config, t_init=625, input_type="scaled_noise")


@pytest.fixture(scope="module")
def tiny_unets():
    teacher = get_dummy_components()["unet"].requires_grad_(False)
    fake = get_dummy_components(seed=1)["unet"]
    student = get_dummy_components(seed=2)["unet"]
    return teacher, fake, student


def _embeds(batch=2, seed=0):
    return torch.randn(batch, 16, 32, generator=torch.Generator().manual_seed(seed)), torch.zeros(1, 16, 32)


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_fake_score_equal_to_teacher_gives_zero_loss_and_gradient(tiny_unets, alpha):
    teacher, fake, student = tiny_unets
    scheduler = _scheduler()
    prompt_embeds, uncond = _embeds()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fake.requires_grad_(False)

    def student_grad(fake_unet):
        student.zero_grad(set_to_none=True)
        x_g = student_generate(student, scheduler, noise, prompt_embeds)
        loss, _ = SiDLoss.lsg(2.0, alpha=alpha).generator_loss(
            Denoiser.from_scheduler(teacher, scheduler), Denoiser.from_scheduler(fake_unet, scheduler), x_g,
            prompt_embeds, uncond, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])

    loss_same, grad_same = student_grad(teacher)
    _, grad_other = student_grad(fake)
    fake.requires_grad_(True)
    # y_real == y_fake exactly, so the loss is exactly 0; the gradient cancels between the two networks' backward
    # passes (J^T g - J^T g), which autograd sums in some order: zero up to float32 rounding
    assert loss_same.item() == 0.0
    assert grad_same.norm() < 1e-5 * grad_other.norm()


def test_gradients_reach_only_the_trainable_player_and_are_deterministic(tiny_unets):
    teacher, fake, student = tiny_unets
    scheduler = _scheduler()
    teacher_d, fake_d = Denoiser.from_scheduler(teacher, scheduler), Denoiser.from_scheduler(fake, scheduler)
    prompt_embeds, uncond = _embeds()
    loss_fn = SiDLoss.lsg(1.5)

    def run(seed):
        for module in (student, fake):
            module.zero_grad(set_to_none=True)
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        # generator step: the fake score frozen for it, as the official loop
        fake.requires_grad_(False)
        x_g = student_generate(student, scheduler, noise, prompt_embeds)
        loss_g, _ = loss_fn.generator_loss(
            teacher_d, fake_d, x_g, prompt_embeds, uncond, generator=torch.Generator().manual_seed(seed)
        )
        loss_g.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        assert all(p.grad is None for p in fake.parameters()) and all(p.grad is None for p in teacher.parameters())
        # fake-score step: only the fake score gets gradients (x_g detached inside)
        fake.requires_grad_(True)
        student.zero_grad(set_to_none=True)
        loss_f, _ = loss_fn.fake_score_loss(
            fake_d, x_g, prompt_embeds, uncond, generator=torch.Generator().manual_seed(seed)
        )
        loss_f.backward()
        assert all(p.grad is None for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())
        return loss_g.detach(), loss_f.detach()

    first, second, other = run(0), run(0), run(1)
    assert all(torch.isfinite(v) for v in first)
    assert first[0] == second[0] and first[1] == second[1]
    assert first[0] != other[0] and first[1] != other[1]


def test_trainable_fake_score_receives_generator_gradient_unless_frozen(tiny_unets):
    # documented behaviour: the loss does not stop gradients, so a trainable fake score accumulates .grad
    teacher, fake, student = tiny_unets
    scheduler = _scheduler()
    prompt_embeds, uncond = _embeds()
    fake.requires_grad_(True).zero_grad(set_to_none=True)
    x_g = student_generate(student, scheduler, torch.randn(2, 4, 8, 8), prompt_embeds)
    loss, _ = SiDLoss().generator_loss(
        Denoiser.from_scheduler(teacher, scheduler), Denoiser.from_scheduler(fake, scheduler), x_g, prompt_embeds,
        uncond, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    loss.backward()
    assert any(p.grad is not None for p in fake.parameters())
    fake.zero_grad(set_to_none=True)


def test_non_finite_samples_are_dropped_but_counted():
    teacher, fake = ToyUNet(0.5, 1.0), ToyUNet(0.2, 0.5)
    x_g, noise, timesteps, cond, uncond = _toy_inputs()
    loss_fn = SiDLoss(alpha=1.2, guidance_scale_teacher=2.0)
    args = (Denoiser(teacher, ABAR), Denoiser(fake, ABAR))
    clean = [
        loss_fn.generator_loss(*args, x_g[i : i + 1], cond[:1], uncond, noise=noise[i : i + 1],
                               timesteps=timesteps[i : i + 1])[0]
        for i in range(3)
    ]  # fmt: skip
    bad = x_g.clone()
    bad[1, 0, 0, 0], bad[2, 0, 1, 1] = float("nan"), float("inf")
    bad.requires_grad_(True)
    loss, logs = loss_fn.generator_loss(*args, bad, cond, uncond, noise=noise, timesteps=timesteps)
    assert logs["num_nonfinite"] == 2
    torch.testing.assert_close(loss, clean[0] / 3)  # sample 0 alone, divided by the full batch of 3
    loss.backward()
    assert torch.isfinite(bad.grad).all() and (bad.grad[1:] == 0).all() and bad.grad[0].abs().sum() > 0

    all_bad = torch.full_like(x_g, float("nan"))
    loss, logs = loss_fn.generator_loss(*args, all_bad, cond, uncond, noise=noise, timesteps=timesteps)
    assert loss.item() == 0.0 and logs["num_nonfinite"] == 3

    loss_f, logs_f = loss_fn.fake_score_loss(args[1], bad.detach(), cond, uncond, noise=noise, timesteps=timesteps)
    expected, _ = loss_fn.fake_score_loss(args[1], x_g[:1], cond[:1], uncond, noise=noise[:1], timesteps=timesteps[:1])
    assert logs_f["num_nonfinite_fake"] == 2
    torch.testing.assert_close(loss_f, expected / 3)


def test_prompt_dropout_only_with_guidance_and_validation():
    g = torch.Generator().manual_seed(0)
    assert not SiDLoss().sample_uncond_mask(1000, generator=g).any()
    rate = SiDLoss(guidance_scale_fake=1.5).sample_uncond_mask(4000, generator=g).float().mean()
    assert 0.08 < rate < 0.12
    loss_fn = SiDLoss()
    x = torch.zeros(2, 1, 2, 2)
    timesteps = loss_fn._draws(x, None, None, 1000, torch.Generator().manual_seed(0))[1]
    assert timesteps.min() >= 20 and timesteps.max() <= 979
    with pytest.raises(ValueError, match="max_timestep"):
        SiDLoss(max_timestep=999).generator_loss(
            Denoiser(ToyUNet(0.0, 0.0), ABAR[:500]), Denoiser(ToyUNet(0.0, 0.0), ABAR[:500]), x, torch.zeros(2, 3, 4),
            torch.zeros(1, 3, 4),
        )  # fmt: skip
    with pytest.raises(ValueError, match="uncond_prob"):
        SiDLoss(uncond_prob=2.0)
    with pytest.raises(ValueError, match="finite"):
        SiDLoss(alpha=float("nan"))
