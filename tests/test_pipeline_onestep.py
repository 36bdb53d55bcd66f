import logging
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from peft import LoraConfig, get_peft_model_state_dict

import diffusers_onestep.pipelines.loading as loading
from diffusers_onestep import ConsistencyStudentScheduler, OneStepPipeline
from diffusers_onestep.pipelines.text_encoding import encode_prompt
from diffusers_onestep.testing_utils import get_dummy_components, get_dummy_teacher_components
from tests.pipeline_mixins import PipelineChecksMixin


def make_pipeline(t_init=999, input_type="noise", prediction_type="epsilon", seed=0):
    components = get_dummy_components(seed=seed, prediction_type=prediction_type)
    scheduler = ConsistencyStudentScheduler.from_config(
        components.pop("scheduler").config, t_init=t_init, input_type=input_type
    )
    pipe = OneStepPipeline(**components, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(seed=0, **overrides):
    return {"prompt": "a photo of a cat", "generator": torch.Generator().manual_seed(seed), "output_type": "np"} | (
        overrides
    )


class TestOneStepPipelineGeneric(PipelineChecksMixin):
    def get_pipeline(self):
        return make_pipeline()

    def get_inputs(self, seed=0):
        return inputs(seed, negative_prompt="dog")


@torch.no_grad()
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t_init,input_type", [(999, "noise"), (625, "scaled_noise")])
def test_one_step_equals_manual_formula(prediction_type, t_init, input_type):
    """UNet once at t_init on z (or s z), the x0 formula, VAE decode: nothing else happens."""
    pipe = make_pipeline(t_init, input_type, prediction_type)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    abar = pipe.scheduler.alphas_cumprod[t_init].double()
    a, s = abar.sqrt(), (1 - abar).sqrt()
    x_t = z if input_type == "noise" else (s * z).float()
    embeds = encode_prompt(pipe.tokenizer, pipe.text_encoder, "a photo of a cat")
    out = pipe.unet(x_t, t_init, encoder_hidden_states=embeds).sample.double()
    x_t = x_t.double()
    x0 = {"epsilon": (x_t - s * out) / a, "v_prediction": a * x_t - s * out, "sample": out}[prediction_type]
    expected = pipe.vae.decode(x0.float() / pipe.vae.config.scaling_factor).sample
    expected = (expected / 2 + 0.5).clamp(0, 1)
    got = pipe("a photo of a cat", latents=z, output_type="pt").images
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    latent = pipe("a photo of a cat", latents=z, output_type="latent").images
    torch.testing.assert_close(latent.double(), x0, rtol=1e-4, atol=1e-5)


def test_prompt_embeds_path_equals_prompt_path():
    pipe = make_pipeline()
    embeds = encode_prompt(pipe.tokenizer, pipe.text_encoder, ["a photo of a cat"])
    negative = encode_prompt(pipe.tokenizer, pipe.text_encoder, ["dog"])
    by_text = pipe(**inputs(negative_prompt="dog")).images
    by_embeds = pipe(**inputs(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)).images
    np.testing.assert_allclose(by_embeds, by_text, atol=1e-6)


def test_encode_prompt_matches_stable_diffusion():
    sd = StableDiffusionPipeline(**get_dummy_teacher_components())
    prompts = ["a cat", "the digit seven"]
    ours = encode_prompt(sd.tokenizer, sd.text_encoder, prompts, num_images_per_prompt=2)
    theirs, _ = sd.encode_prompt(prompts, "cpu", 2, False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # clip_skip: the penultimate layer through the final layer norm (diffusers' own path assumes transformers 4's
    # `text_model` attribute, so it is checked by hand here)
    ids = sd.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    hidden = sd.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    expected = sd.text_encoder.final_layer_norm(hidden)
    torch.testing.assert_close(encode_prompt(sd.tokenizer, sd.text_encoder, prompts, clip_skip=1), expected)


def test_output_types():
    pipe = make_pipeline()
    pil = pipe(**inputs(output_type="pil")).images
    assert isinstance(pil, list) and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (16, 16)
    np_images = pipe(**inputs()).images
    assert np_images.shape == (1, 16, 16, 3) and np_images.min() >= 0 and np_images.max() <= 1
    pt = pipe(**inputs(output_type="pt")).images
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), np_images, atol=1e-6)
    assert pipe(**inputs(output_type="latent")).images.shape == (1, 4, 8, 8)
    np.testing.assert_allclose(np.asarray(pil[0]), (np_images[0] * 255).round(), atol=1)


def test_negative_prompt_steers_through_nasa_only():
    pipe = make_pipeline()
    plain = pipe(**inputs()).images
    steered = pipe(**inputs(negative_prompt="dog")).images
    assert np.abs(steered - plain).max() > 1e-4
    np.testing.assert_array_equal(pipe(**inputs(negative_prompt="dog", nasa_scale=0.0)).images, plain)
    stronger = pipe(**inputs(negative_prompt="dog", nasa_scale=1.0)).images
    assert np.abs(stronger - plain).max() > np.abs(steered - plain).max()
    # processors are back to what they were after the call
    assert not any("NASA" in type(p).__name__ for p in pipe.unet.attn_processors.values())


def test_nasa_call_does_not_flood_the_log(caplog):
    pipe = make_pipeline()
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            pipe(**inputs(negative_prompt="dog"))
    finally:
        diffusers_logging.disable_propagation()
    assert not [r for r in caplog.records if "cross_attention_kwargs" in r.getMessage()]


def test_output_space_cfg_is_opt_in_and_costs_two_evaluations():
    pipe = make_pipeline()
    default = pipe(**inputs(negative_prompt="dog", nasa_scale=0.0))
    cfg = pipe(**inputs(negative_prompt="dog", nasa_scale=0.0, guidance_scale=2.0))
    assert default.nfe == 1 and cfg.nfe == 2
    assert np.abs(cfg.images - default.images).max() > 1e-4


def test_multi_step_and_custom_timesteps_and_progress():
    pipe = make_pipeline()
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, int(t), kwargs["denoised"].shape))
        return {}

    out = pipe(**inputs(num_inference_steps=3, callback_on_step_end=callback,
                        callback_on_step_end_tensor_inputs=["latents", "denoised"]))  # fmt: skip
    assert out.nfe == 3 and [s[:2] for s in seen] == [(0, 999), (1, 666), (2, 333)]
    custom = pipe(**inputs(timesteps=[999, 500]))
    assert custom.nfe == 2 and np.abs(custom.images - out.images).max() > 1e-5


def test_callback_can_replace_latents():
    pipe = make_pipeline()

    def zero_latents(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])}

    replaced = pipe(**inputs(callback_on_step_end=zero_latents, output_type="latent")).images
    assert torch.count_nonzero(torch.as_tensor(replaced)) == 0


def test_bf16_on_cpu():
    pipe = make_pipeline().to(torch.bfloat16)
    images = pipe(**inputs(negative_prompt="dog", num_inference_steps=2)).images
    assert np.isfinite(images).all()
    reference = make_pipeline()(**inputs(negative_prompt="dog", num_inference_steps=2)).images
    assert np.abs(images - reference).mean() < 0.05


def add_student_lora(unet, rank=4, alpha=4, seed=0):
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False), adapter_name="student")  # fmt: skip
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


@pytest.mark.parametrize("rank,alpha", [(4, 4), (4, 16)])
def test_lora_load_changes_output_and_unload_restores(tmp_path, rank, alpha):
    trained = make_pipeline()
    add_student_lora(trained.unet, rank, alpha)
    expected = trained(**inputs()).images
    OneStepPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(trained.unet, adapter_name="student"),
        unet_lora_adapter_metadata=trained.unet.peft_config["student"].to_dict(), safe_serialization=True,
    )  # fmt: skip
    pipe = make_pipeline()
    base = pipe(**inputs()).images
    pipe.load_lora_weights(tmp_path)
    loaded = pipe(**inputs()).images
    assert np.abs(loaded - base).max() > 1e-3
    np.testing.assert_allclose(loaded, expected, atol=1e-5)
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(pipe(**inputs()).images, base)


def test_from_teacher_object_and_directory(tmp_path, tiny_teacher_dir):
    teacher = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir)
    student = get_dummy_components(seed=5)["unet"]
    student.save_pretrained(tmp_path / "student")
    from_object = OneStepPipeline.from_teacher(teacher, unet=student, t_init=625, input_type="scaled_noise")
    from_dirs = OneStepPipeline.from_teacher(tiny_teacher_dir, unet=str(tmp_path / "student"), t_init=625,
                                             input_type="scaled_noise")  # fmt: skip
    assert from_object.vae is teacher.vae and from_object.unet is student
    assert from_dirs.scheduler.config.t_init == 625 and from_dirs.scheduler.config.input_type == "scaled_noise"
    assert from_dirs.scheduler.config.beta_schedule == teacher.scheduler.config.beta_schedule
    for pipe in (from_object, from_dirs):
        pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(from_object(**inputs()).images, from_dirs(**inputs()).images, atol=1e-6)
    with pytest.raises(ValueError, match="unet.*lora"):
        OneStepPipeline.from_teacher(teacher)


def test_from_teacher_with_lora(tmp_path, tiny_teacher_dir):
    trained = OneStepPipeline.from_teacher(tiny_teacher_dir, unet=tiny_teacher_dir)
    trained.set_progress_bar_config(disable=True)
    add_student_lora(trained.unet, 4, 8)
    expected = trained(**inputs()).images
    OneStepPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(trained.unet, adapter_name="student"),
        unet_lora_adapter_metadata=trained.unet.peft_config["student"].to_dict(), safe_serialization=True,
    )  # fmt: skip
    pipe = OneStepPipeline.from_teacher(tiny_teacher_dir, lora=str(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(pipe(**inputs()).images, expected, atol=1e-5)


def test_from_pretrained_hub_id_uses_snapshot_download(tmp_path, monkeypatch):
    pipe = make_pipeline()
    expected = pipe(**inputs()).images
    pipe.save_pretrained(tmp_path / "repo")
    shutil.copy(__file__, tmp_path / "repo" / "pickled.bin")  # must not be requested
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path / "repo")

    monkeypatch.setattr(loading.huggingface_hub, "snapshot_download", fake_snapshot_download)
    reloaded = OneStepPipeline.from_pretrained("someone/onestep-student", revision="main")
    reloaded.set_progress_bar_config(disable=True)
    assert calls[0][0] == "someone/onestep-student" and calls[0][1]["revision"] == "main"
    assert "*.bin" in calls[0][1]["ignore_patterns"]
    np.testing.assert_allclose(reloaded(**inputs()).images, expected, atol=1e-6)
    assert isinstance(reloaded.scheduler, ConsistencyStudentScheduler)
    with pytest.raises(ValueError, match="use_safetensors"):
        OneStepPipeline.from_pretrained(str(tmp_path / "repo"), use_safetensors=False)


def test_model_index_names_our_scheduler(tmp_path):
    make_pipeline().save_pretrained(tmp_path)
    import json

    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "OneStepPipeline" and index["nasa_scale"] == 0.1
    assert index["scheduler"][1] == "ConsistencyStudentScheduler"
    assert not any(name.endswith(".bin") for _, _, files in os.walk(tmp_path) for name in files)


def test_execution_device_walks_modules_only_when_offload_hooks_exist(monkeypatch):
    from diffusers import DiffusionPipeline

    pipe = make_pipeline()
    assert pipe._execution_device == torch.device("cpu")
    walked = []
    monkeypatch.setattr(DiffusionPipeline, "_execution_device", property(lambda self: walked.append(1) or "hooked"))
    assert pipe._execution_device == torch.device("cpu") and not walked
    pipe.unet._hf_hook = object()
    assert pipe._execution_device == "hooked" and walked


def test_cross_attention_dim_mismatch_is_refused():
    components = get_dummy_components()
    other = get_dummy_components(cross_attention_dim=24)["unet"]
    scheduler = ConsistencyStudentScheduler.from_config(components.pop("scheduler").config)
    components["unet"] = other
    with pytest.raises(ValueError, match="cross_attention_dim"):
        OneStepPipeline(**components, scheduler=scheduler)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"prompt": None}, "exactly one of `prompt` or `prompt_embeds`"),
        ({"prompt_embeds": torch.zeros(1, 16, 32)}, "exactly one of `prompt` or `prompt_embeds`"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]}, "`negative_prompt` has batch size 3"),
        ({"negative_prompt": "x", "negative_prompt_embeds": torch.zeros(1, 16, 32)}, "at most one of"),
        ({"prompt": None, "prompt_embeds": torch.zeros(1, 16, 24)}, "`prompt_embeds` has last dimension 24"),
        ({"height": 15}, "`height` must be a positive multiple of 2"),
        ({"width": 7}, "`width` must be a positive multiple of 2"),
        ({"num_inference_steps": 0}, "`num_inference_steps` must be an integer >= 1"),
        ({"timesteps": [999, 1000]}, r"`timesteps` must be .* in \[0, 1000\)"),
        ({"timesteps": [500, 700]}, "strictly descending"),
        ({"timesteps": [500, 500]}, "strictly descending"),
        ({"nasa_scale": -0.5}, "`nasa_scale` must be finite and >= 0"),
        ({"nasa_scale": float("nan")}, "`nasa_scale` must be finite and >= 0"),
        ({"guidance_scale": -0.5}, "`guidance_scale` must be a finite number >= 0"),
        ({"guidance_scale": float("inf")}, "`guidance_scale` must be a finite number >= 0"),
        ({"guidance_scale": 2.0, "nasa_scale": 0.2}, "NASA cannot run in the same call"),
        ({"generator": [torch.Generator(), torch.Generator()]}, "`generator` is a list of 2"),
        ({"output_type": "jpeg"}, "`output_type` must be one of"),
        ({"num_images_per_prompt": 0}, "`num_images_per_prompt` must be an integer >= 1"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
        ({"latents": torch.zeros(2, 4, 8, 8)}, "`latents` has batch size 2"),
    ],
)
def test_invalid_inputs_raise_before_any_work(overrides, match, monkeypatch):
    pipe = make_pipeline()

    def no_work(*args, **kwargs):
        raise AssertionError("the text encoder ran before validation")

    monkeypatch.setattr(pipe.text_encoder, "forward", no_work)
    with pytest.raises(ValueError, match=match):
        pipe(**inputs(**overrides))
