"""`ConsistencyStudentScheduler`: config, timesteps, the x0 formula of one step, re-noising, randomness, dtypes."""

import pytest
import torch
from diffusers import DDPMScheduler, LCMScheduler
from diffusers.utils.torch_utils import randn_tensor

from diffusers_onestep.schedulers import ConsistencyStudentScheduler, ConsistencyStudentSchedulerOutput


SHAPE = (2, 4, 8, 8)
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}  # DDPMScheduler's defaults differ from ours (SD's)


def _randn(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _a_s(scheduler, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    abar = scheduler.alphas_cumprod[t]
    return abar.sqrt(), (1 - abar).sqrt()


def _x0_by_hand(prediction_type: str, model_output, x_t, a, s):
    return {"epsilon": (x_t - s * model_output) / a, "v_prediction": a * x_t - s * model_output}.get(
        prediction_type, model_output
    )


def _sample(scheduler, latents, model_outputs, generator=None):
    """The pipeline's loop, with canned model outputs; returns the final sample and every `denoised`."""
    denoised = []
    for t, model_output in zip(scheduler.timesteps, model_outputs):
        scheduler.scale_model_input(latents, t)
        latents, x0 = scheduler.step(model_output, t, latents, generator=generator, return_dict=False)
        denoised.append(x0)
    return latents, denoised


# Config


def test_save_config_round_trip(tmp_path):
    scheduler = ConsistencyStudentScheduler(t_init=625, input_type="scaled_noise", prediction_type="v_prediction")
    scheduler.save_config(tmp_path)
    loaded = ConsistencyStudentScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    assert torch.equal(loaded.alphas_cumprod, scheduler.alphas_cumprod)


def test_from_config_interop_with_ddpm_and_lcm():
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", **SD_BETAS)
    ours = ConsistencyStudentScheduler.from_config(ddpm.config)
    assert ours.config.prediction_type == "v_prediction" and ours.config.t_init == 999
    assert torch.equal(ours.alphas_cumprod, ddpm.alphas_cumprod)

    ours = ConsistencyStudentScheduler(t_init=625, prediction_type="v_prediction")
    lcm = LCMScheduler.from_config(ours.config)
    assert lcm.config.prediction_type == "v_prediction"
    assert torch.equal(lcm.alphas_cumprod, ours.alphas_cumprod)
    assert ConsistencyStudentScheduler.from_config(lcm.config).config.prediction_type == "v_prediction"
    assert LCMScheduler in ours.compatibles and DDPMScheduler in ours.compatibles


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("rescale_betas_zero_snr", [False, True])
def test_noise_schedule_matches_ddpm(beta_schedule, rescale_betas_zero_snr):
    kwargs = {"beta_schedule": beta_schedule, "rescale_betas_zero_snr": rescale_betas_zero_snr, **SD_BETAS}
    ours = ConsistencyStudentScheduler(prediction_type="v_prediction", **kwargs)
    assert torch.equal(ours.alphas_cumprod, DDPMScheduler(**kwargs).alphas_cumprod)


def test_trained_betas_and_len():
    betas = torch.linspace(1e-4, 2e-2, 1000).tolist()
    scheduler = ConsistencyStudentScheduler(trained_betas=betas)
    assert torch.equal(scheduler.alphas_cumprod, DDPMScheduler(trained_betas=betas).alphas_cumprod)
    assert len(scheduler) == 1000 and len(ConsistencyStudentScheduler(num_train_timesteps=50, t_init=49)) == 50


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"t_init": 1000}, "t_init"),
        ({"t_init": -1}, "t_init"),
        ({"t_init": 10.5}, "t_init"),
        ({"input_type": "latents"}, "input_type"),
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"trained_betas": [0.01] * 10}, "trained_betas"),
        ({"clip_sample": True, "clip_sample_range": 0.0}, "clip_sample_range"),
        ({"rescale_betas_zero_snr": True}, "t_init"),  # epsilon at a_999 = 0
    ],
)
def test_init_validation(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ConsistencyStudentScheduler(**kwargs)


# Timesteps


@pytest.mark.parametrize(
    "t_init, num_inference_steps, expected",
    [
        (999, 1, [999]),
        (625, 1, [625]),
        (999, 4, [999, 749, 499, 249]),
        (625, 4, [625, 468, 312, 156]),  # 625 * (1, 3/4, 1/2, 1/4) = 625, 468.75, 312.5, 156.25
        (625, 2, [625, 312]),
        (3, 4, [3, 2, 1, 0]),  # K = t_init + 1: the largest K without repeated timesteps
    ],
)
def test_set_timesteps_default_rule(t_init, num_inference_steps, expected):
    scheduler = ConsistencyStudentScheduler(t_init=t_init)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    assert scheduler.timesteps.tolist() == expected and scheduler.timesteps.dtype == torch.long
    assert scheduler.num_inference_steps == num_inference_steps and scheduler.step_index is None


@pytest.mark.parametrize("timesteps", [[999, 759, 499, 259], torch.tensor([500, 20]), [0]])
def test_set_timesteps_custom(timesteps):
    scheduler = ConsistencyStudentScheduler()
    scheduler.set_timesteps(timesteps=timesteps)
    assert scheduler.timesteps.tolist() == list(torch.as_tensor(timesteps).tolist())
    assert scheduler.num_inference_steps == len(timesteps)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({}, "num_inference_steps"),
        ({"num_inference_steps": 2, "timesteps": [999, 499]}, "num_inference_steps"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 1001}, "num_inference_steps"),
        ({"num_inference_steps": 1.5}, "num_inference_steps"),
        ({"timesteps": []}, "timesteps"),
        ({"timesteps": [999.5, 500]}, "timesteps"),
        ({"timesteps": [1000, 500]}, "timesteps"),
        ({"timesteps": [500, -1]}, "timesteps"),
        ({"timesteps": [500, 500]}, "timesteps"),
        ({"timesteps": [200, 500]}, "timesteps"),
    ],
)
def test_set_timesteps_validation(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ConsistencyStudentScheduler().set_timesteps(**kwargs)


def test_duplicate_timesteps_are_refused():
    scheduler = ConsistencyStudentScheduler(t_init=3)
    with pytest.raises(ValueError, match="`num_inference_steps`.*repeat timesteps"):
        scheduler.set_timesteps(5)


def test_zero_snr_epsilon_refuses_the_last_timestep():
    scheduler = ConsistencyStudentScheduler(rescale_betas_zero_snr=True, t_init=998)
    with pytest.raises(ValueError, match="`timesteps`"):
        scheduler.set_timesteps(timesteps=[999, 499])
    scheduler.set_timesteps(timesteps=[998, 499])


# One step: the x0 formula


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("input_type, t_init", [("noise", 999), ("scaled_noise", 625)])
def test_single_step_equals_x0_formula(prediction_type, input_type, t_init):
    scheduler = ConsistencyStudentScheduler(t_init=t_init, input_type=input_type, prediction_type=prediction_type)
    scheduler.set_timesteps(1)
    z, model_output = _randn(0), _randn(1)
    a, s = _a_s(scheduler, t_init)
    x_t = s * z if input_type == "scaled_noise" else z

    model_input = scheduler.scale_model_input(z, scheduler.timesteps[0])
    output = scheduler.step(model_output, scheduler.timesteps[0], z)

    assert torch.equal(model_input, x_t)
    assert isinstance(output, ConsistencyStudentSchedulerOutput)
    assert torch.equal(output.denoised, _x0_by_hand(prediction_type, model_output, x_t, a, s))
    assert torch.equal(output.prev_sample, output.denoised) and scheduler.step_index == 1


def test_clip_sample():
    scheduler = ConsistencyStudentScheduler(prediction_type="sample", clip_sample=True, clip_sample_range=0.5)
    scheduler.set_timesteps(1)
    model_output = 3 * _randn(1)
    denoised = scheduler.step(model_output, 999, _randn(0)).denoised
    assert torch.equal(denoised, model_output.clamp(-0.5, 0.5))


# Several steps: re-noising


@pytest.mark.parametrize("input_type", ["noise", "scaled_noise"])
def test_multistep_renoises_x0_with_fresh_noise(input_type):
    scheduler = ConsistencyStudentScheduler(t_init=625, input_type=input_type)
    scheduler.set_timesteps(2)
    (t0, t1), z = scheduler.timesteps.tolist(), _randn(0)
    eps0, eps1 = _randn(1), _randn(2)

    first = scheduler.step(eps0, t0, z, generator=torch.Generator().manual_seed(7))
    a0, s0 = _a_s(scheduler, t0)
    x_t0 = s0 * z if input_type == "scaled_noise" else z
    x0 = (x_t0 - s0 * eps0) / a0
    a1, s1 = _a_s(scheduler, t1)
    noise = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    assert torch.equal(first.denoised, x0)
    assert torch.equal(first.prev_sample, a1 * x0 + s1 * noise)

    # The re-noised sample already is x_t: no input scaling on later steps.
    assert torch.equal(scheduler.scale_model_input(first.prev_sample, t1), first.prev_sample)
    last = scheduler.step(eps1, t1, first.prev_sample, generator=torch.Generator().manual_seed(8))
    assert torch.equal(last.denoised, (first.prev_sample - s1 * eps1) / a1)
    assert torch.equal(last.prev_sample, last.denoised)


def test_begin_index_skips_the_first_step_input_rule():
    scheduler = ConsistencyStudentScheduler(input_type="scaled_noise")
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(1)
    x_t = _randn(0)
    assert torch.equal(scheduler.scale_model_input(x_t, scheduler.timesteps[1]), x_t)
    scheduler.step(_randn(1), scheduler.timesteps[1], x_t)
    assert scheduler.step_index == 2


def test_step_errors():
    scheduler = ConsistencyStudentScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(_randn(1), 999, _randn(0))
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(_randn(1), 998, _randn(0))


def test_generator_determinism_and_return_dict():
    scheduler = ConsistencyStudentScheduler()
    outputs = [_randn(i) for i in range(1, 5)]

    def run(seed):
        scheduler.set_timesteps(4)
        return _sample(scheduler, _randn(0), outputs, torch.Generator().manual_seed(seed))

    (sample_a, denoised_a), (sample_b, denoised_b), (sample_c, _) = run(0), run(0), run(1)
    assert torch.equal(sample_a, sample_b) and all(map(torch.equal, denoised_a, denoised_b))
    assert not torch.equal(sample_a, sample_c)
    assert torch.equal(sample_a, denoised_a[-1])


def test_list_of_generators_matches_per_sample_runs():
    scheduler = ConsistencyStudentScheduler(input_type="scaled_noise", t_init=625)
    z, outputs = _randn(0), [_randn(1), _randn(2), _randn(3)]
    scheduler.set_timesteps(3)
    batched, _ = _sample(scheduler, z, outputs, [torch.Generator().manual_seed(s) for s in (10, 11)])
    singles = []
    for i, seed in enumerate((10, 11)):
        scheduler.set_timesteps(3)
        single, _ = _sample(
            scheduler, z[i : i + 1], [o[i : i + 1] for o in outputs], torch.Generator().manual_seed(seed)
        )
        singles.append(single)
    assert torch.equal(batched, torch.cat(singles))


@pytest.mark.parametrize("num_inference_steps", [1, 2])
def test_dtype_and_shape_are_preserved(num_inference_steps):
    scheduler = ConsistencyStudentScheduler(input_type="scaled_noise", prediction_type="v_prediction")
    scheduler.set_timesteps(num_inference_steps)
    t = scheduler.timesteps[0]
    z, model_output = _randn(0).bfloat16(), _randn(1).bfloat16()
    assert scheduler.scale_model_input(z, t).dtype == torch.bfloat16
    prev_sample, denoised = scheduler.step(model_output, t, z, generator=torch.Generator().manual_seed(0)).to_tuple()
    assert prev_sample.dtype == denoised.dtype == torch.bfloat16
    assert prev_sample.shape == denoised.shape == SHAPE

    scheduler.set_timesteps(num_inference_steps)
    reference = scheduler.step(model_output.float(), t, z.float(), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prev_sample.float(), reference.prev_sample, atol=0.05, rtol=0.02)


# add_noise


def test_add_noise():
    scheduler = ConsistencyStudentScheduler()
    x0, noise, timesteps = _randn(0), _randn(1), torch.tensor([10, 900])
    noisy = scheduler.add_noise(x0, noise, timesteps)
    for i, t in enumerate(timesteps.tolist()):
        a, s = _a_s(scheduler, t)
        assert torch.equal(noisy[i], a * x0[i] + s * noise[i])
    torch.testing.assert_close(
        noisy, DDPMScheduler(beta_schedule="scaled_linear", **SD_BETAS).add_noise(x0, noise, timesteps)
    )
    assert scheduler.add_noise(x0.bfloat16(), noise.bfloat16(), 500).dtype == torch.bfloat16


def test_mid_timestep_gives_the_consistency_multistep_schedule_and_round_trips(tmp_path):
    scheduler = ConsistencyStudentScheduler(mid_timestep=296)
    for steps, expected in [(1, [999]), (2, [999, 296]), (3, [999, 296, 148]), (4, [999, 296, 197, 98])]:
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == expected
    scheduler.set_timesteps(297)  # t_init, then 296 .. 1: the most steps without a repeat
    assert len(set(scheduler.timesteps.tolist())) == 297
    with pytest.raises(ValueError, match=r"max\(mid_timestep, 1\) \+ 1 = 297"):
        scheduler.set_timesteps(298)
    scheduler.save_config(tmp_path)
    loaded = ConsistencyStudentScheduler.from_pretrained(tmp_path)
    loaded.set_timesteps(2)
    assert loaded.config.mid_timestep == 296 and loaded.timesteps.tolist() == [999, 296]
    for bad in (999, -1, 2.5):
        with pytest.raises(ValueError, match="mid_timestep"):
            ConsistencyStudentScheduler(mid_timestep=bad)
