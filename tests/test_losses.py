"""Math tests of the one-step generator and the PG-SB losses (hand computations, identities, gradient routing)."""

import pytest
import torch
from toy_models import ToyUNet

from diffusers_onestep.losses import Denoiser, PGSwiftBrushLoss, alpha_sigma, clamped_clip_loss, student_generate
from diffusers_onestep.schedulers import ConsistencyStudentScheduler
from diffusers_onestep.testing_utils import get_dummy_components


def _scheduler(prediction_type="epsilon", t_init=999, input_type="noise"):
    config = get_dummy_components()["scheduler"].config
    return ConsistencyStudentScheduler.from_config(
        config, prediction_type=prediction_type, t_init=t_init, input_type=input_type
    )


@pytest.fixture(scope="module")
def tiny_unets():
    components = get_dummy_components()
    teacher = components["unet"].requires_grad_(False)
    fake = get_dummy_components(seed=1)["unet"]
    student = get_dummy_components(seed=2)["unet"]
    return teacher, fake, student


def _embeds(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, 32, generator=g), torch.zeros(1, 16, 32)


def test_student_generate_matches_manual_formula(tiny_unets):
    student = tiny_unets[2]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt_embeds, _ = _embeds()
    for input_type, t_init in (("noise", 999), ("scaled_noise", 625)):
        scheduler = _scheduler(t_init=t_init, input_type=input_type)
        a, s = alpha_sigma(scheduler.alphas_cumprod, t_init)
        x_in = noise if input_type == "noise" else s * noise
        with torch.no_grad():
            eps = student(x_in, torch.full((2,), t_init), encoder_hidden_states=prompt_embeds).sample
            x0 = student_generate(student, scheduler, noise, prompt_embeds)
        torch.testing.assert_close(x0, (x_in - s * eps) / a)


def test_generator_loss_matches_hand_computation():
    teacher, fake = ToyUNet(0.5, 1.0), ToyUNet(0.2, 0.5)
    abar = torch.linspace(0.99, 0.01, 1000)
    loss_fn = PGSwiftBrushLoss()
    x0 = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    timesteps, k = torch.tensor([100, 700]), torch.tensor([0.5, 3.0])
    cond, uncond = torch.full((2, 3, 4), 0.3), torch.zeros(1, 3, 4)
    loss, logs = loss_fn.generator_loss(
        Denoiser(teacher, abar),
        Denoiser(fake, abar),
        x0,
        cond,
        uncond,
        noise=noise,
        timesteps=timesteps,
        guidance_scale=k,
    )

    a, s = abar[timesteps].sqrt().reshape(-1, 1, 1, 1), (1 - abar[timesteps]).sqrt().reshape(-1, 1, 1, 1)
    x_t = a * x0.detach() + s * noise
    k4 = k.reshape(-1, 1, 1, 1)
    # e(k) = e_uncond + k (e_cond - e_uncond); the toy's conditional offset is d * 0.3
    e_teacher, e_fake = 0.5 * x_t + k4 * 1.0 * 0.3, 0.2 * x_t + k4 * 0.5 * 0.3
    grad = s**2 * (e_teacher - e_fake)
    torch.testing.assert_close(loss, 0.5 * (grad**2).mean())
    torch.testing.assert_close(logs["guidance_scale"], k.mean())
    loss.backward()
    # d loss / d x0 = w(t) (e_teacher - e_fake) / numel (mean reduction)
    torch.testing.assert_close(x0.grad, grad / x0.numel())
    assert teacher.c.grad is None and fake.c.grad is None


def test_fake_score_loss_matches_hand_computation():
    fake = ToyUNet(0.2, 0.5)
    abar = torch.linspace(0.99, 0.01, 1000)
    x0 = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    timesteps, mask = torch.tensor([3, 900]), torch.tensor([False, True])
    cond, uncond = torch.full((2, 3, 4), 0.3), torch.full((1, 3, 4), -1.0)
    loss, _ = PGSwiftBrushLoss().fake_score_loss(
        Denoiser(fake, abar), x0, cond, uncond, noise=noise, timesteps=timesteps, uncond_mask=mask
    )
    a, s = abar[timesteps].sqrt().reshape(-1, 1, 1, 1), (1 - abar[timesteps]).sqrt().reshape(-1, 1, 1, 1)
    x_t = a * x0 + s * noise
    offset = torch.tensor([0.3, -1.0]).reshape(-1, 1, 1, 1)  # sample 1 sees the empty prompt
    eps = 0.2 * x_t + 0.5 * offset
    torch.testing.assert_close(loss, (a**2 * (eps - noise) ** 2).mean())
    loss.backward()
    assert fake.c.grad is not None and fake.d.grad is not None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_student_gradient_vanishes_when_fake_score_equals_teacher(tiny_unets, prediction_type):
    teacher, _, student = tiny_unets
    scheduler = _scheduler(prediction_type=prediction_type)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt_embeds, uncond = _embeds()
    x0 = student_generate(student, scheduler, noise, prompt_embeds)
    same = Denoiser(teacher, scheduler.alphas_cumprod, prediction_type)
    student.zero_grad(set_to_none=True)
    loss, _ = PGSwiftBrushLoss().generator_loss(same, same, x0, prompt_embeds, uncond, generator=torch.manual_seed(0))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in student.parameters())


def test_losses_deterministic_finite_and_gradients_reach_only_trainable(tiny_unets):
    teacher, fake, student = tiny_unets
    scheduler = _scheduler()
    fake.requires_grad_(True)
    teacher_d = Denoiser.from_scheduler(teacher, scheduler)
    fake_d = Denoiser.from_scheduler(fake, scheduler)
    prompt_embeds, uncond = _embeds()
    loss_fn = PGSwiftBrushLoss()

    def run(seed):
        for module in (student, fake):
            module.zero_grad(set_to_none=True)
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        x0 = student_generate(student, scheduler, noise, prompt_embeds)
        loss_g, _ = loss_fn.generator_loss(
            teacher_d, fake_d, x0, prompt_embeds, uncond, generator=torch.Generator().manual_seed(seed)
        )
        loss_g.backward()
        student_has_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        fake_untouched = all(p.grad is None for p in fake.parameters())
        loss_f, _ = loss_fn.fake_score_loss(
            fake_d, x0, prompt_embeds, uncond, generator=torch.Generator().manual_seed(seed)
        )
        student.zero_grad(set_to_none=True)
        loss_f.backward()
        assert student_has_grad and fake_untouched
        assert all(p.grad is None for p in student.parameters())
        assert any(p.grad is not None for p in fake.parameters())
        assert all(p.grad is None for p in teacher.parameters())
        return loss_g.detach(), loss_f.detach()

    first, second, other = run(0), run(0), run(1)
    assert all(torch.isfinite(v) for v in first)
    assert first[0] == second[0] and first[1] == second[1]
    assert first[0] != other[0]


def test_guidance_scale_sampling_and_baseline():
    loss_fn = PGSwiftBrushLoss(guidance_scale_range=(0.5, 4.0))
    k = loss_fn.sample_guidance_scale(4096, generator=torch.Generator().manual_seed(0))
    assert 0.5 <= k.min() and k.max() <= 4.0 and k.std() > 0.5
    fixed = PGSwiftBrushLoss(fixed_guidance_scale=4.5).sample_guidance_scale(3)
    torch.testing.assert_close(fixed, torch.full((3,), 4.5))
    with pytest.raises(ValueError, match="guidance_scale_range"):
        PGSwiftBrushLoss(guidance_scale_range=(3.0, 1.0))
    with pytest.raises(ValueError, match="uncond_prob"):
        PGSwiftBrushLoss(uncond_prob=1.5)


def test_fake_score_dropout_rate():
    fake = ToyUNet(0.0, 1.0)
    abar = torch.linspace(0.99, 0.01, 1000)
    cond, uncond = torch.zeros(1000, 1, 1), torch.ones(1, 1, 1)
    # with c = 0 the fake's eps is the prompt offset: 1 where dropped, 0 elsewhere
    captured = {}

    def spy(sample, timestep, encoder_hidden_states, cross_attention_kwargs=None):
        captured["dropped"] = encoder_hidden_states.mean(dim=(1, 2))
        return fake(sample, timestep, encoder_hidden_states)

    spy.dtype = torch.float32
    PGSwiftBrushLoss().fake_score_loss(
        Denoiser(spy, abar), torch.zeros(1000, 1, 1, 1), cond, uncond, generator=torch.Generator().manual_seed(0)
    )
    assert 0.07 < captured["dropped"].mean() < 0.13


def test_clamped_clip_loss():
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    img = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(clamped_clip_loss(img, txt, tau=0.37), torch.tensor([0.0, 0.37, 1.37]))
