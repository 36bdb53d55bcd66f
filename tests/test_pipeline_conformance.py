"""Regression tests for the silent wrong results and diffusers conventions of issue 8 (and the inference edge of 9).

Each test names the item it proves. Tiny components built in code, offline.
"""

import json
import os
import shutil

import diffusers
import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline, StableDiffusionPipeline
from diffusers.callbacks import SDCFGCutoffCallback
from peft import LoraConfig, get_peft_model_state_dict

from diffusers_onestep import ConsistencyStudentScheduler, OneStepPipeline
from diffusers_onestep.testing_utils import get_dummy_components


def make_pipeline(seed=0, **scheduler_config):
    components = get_dummy_components(seed=seed)
    scheduler = ConsistencyStudentScheduler.from_config(components.pop("scheduler").config, **scheduler_config)
    pipe = OneStepPipeline(**components, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(seed=0, **overrides):
    base = {"prompt": "a photo of a cat", "generator": torch.Generator().manual_seed(seed), "output_type": "np"}
    return base | overrides


def add_lora(unet, rank=4, alpha=8, name="student"):
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name=name)  # fmt: skip
    with torch.no_grad():  # lora_B starts at zero: make the adapter change the output
        for param_name, param in unet.named_parameters():
            if "lora_B" in param_name:
                param.normal_(0, 0.5)


def teacher_images(teacher):
    return teacher("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="np").images  # fmt: skip


# ---------------------------------------------------------------- 1. the student's saved config wins


@pytest.fixture
def saved_student(tmp_path):
    """A full student saved with a non-default scheduler config (t_init 625, scaled noise) and nasa_scale 0.3."""
    pipe = make_pipeline(seed=3, t_init=625, input_type="scaled_noise")
    pipe.register_to_config(nasa_scale=0.3)
    pipe.save_pretrained(tmp_path / "student")
    return pipe, str(tmp_path / "student")


@pytest.mark.parametrize("subfolder", ["", "unet"])
def test_from_teacher_uses_the_students_saved_config(saved_student, tiny_teacher_dir, subfolder):
    student, path = saved_student
    pipe = OneStepPipeline.from_teacher(tiny_teacher_dir, unet=os.path.join(path, subfolder))
    assert pipe.scheduler.config.t_init == 625 and pipe.scheduler.config.input_type == "scaled_noise"
    assert pipe.config.nasa_scale == 0.3
    # the same images as the saved student itself (same UNet, same scheduler; the tiny teacher has other encoders,
    # so compare against the student rebuilt on the teacher's encoders)
    rebuilt = OneStepPipeline.from_teacher(tiny_teacher_dir, unet=os.path.join(path, "unet"), t_init=625,
                                           input_type="scaled_noise", nasa_scale=0.3)  # fmt: skip
    for p in (pipe, rebuilt):
        p.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(pipe(**inputs(negative_prompt="dog")).images,
                                  rebuilt(**inputs(negative_prompt="dog")).images)  # fmt: skip


def test_explicit_arguments_override_the_saved_config(saved_student, tiny_teacher_dir):
    _, path = saved_student
    pipe = OneStepPipeline.from_teacher(tiny_teacher_dir, unet=path, t_init=999, nasa_scale=0.2)
    assert pipe.scheduler.config.t_init == 999 and pipe.scheduler.config.input_type == "scaled_noise"
    assert pipe.config.nasa_scale == 0.2


def test_a_bare_unet_gets_the_documented_defaults(tmp_path, tiny_teacher_dir):
    get_dummy_components(seed=5)["unet"].save_pretrained(tmp_path / "bare")
    pipe = OneStepPipeline.from_teacher(tiny_teacher_dir, unet=str(tmp_path / "bare"))
    assert (pipe.scheduler.config.t_init, pipe.scheduler.config.input_type, pipe.config.nasa_scale) == (
        999, "noise", 0.1,
    )  # fmt: skip


def test_a_lora_students_scheduler_config_is_used(tmp_path, tiny_teacher_dir):
    teacher = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir)
    add_lora(teacher.unet)
    OneStepPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(teacher.unet, adapter_name="student"),
                                      unet_lora_adapter_metadata=teacher.unet.peft_config["student"].to_dict(),
                                      safe_serialization=True)  # fmt: skip
    ConsistencyStudentScheduler.from_config(teacher.scheduler.config, t_init=700).save_pretrained(tmp_path / "scheduler")
    pipe = OneStepPipeline.from_teacher(tiny_teacher_dir, lora=str(tmp_path))
    assert pipe.scheduler.config.t_init == 700


# ---------------------------------------------------------------- 2. the teacher stays the teacher


def _lora_dir(tmp_path, tiny_teacher_dir):
    donor = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir)
    add_lora(donor.unet)
    OneStepPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(donor.unet, adapter_name="student"),
                                      unet_lora_adapter_metadata=donor.unet.peft_config["student"].to_dict(),
                                      safe_serialization=True)  # fmt: skip
    return str(tmp_path)


def test_building_a_lora_student_leaves_the_teacher_bit_identical(tmp_path, tiny_teacher_dir):
    teacher = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir)
    teacher.set_progress_bar_config(disable=True)
    before = teacher_images(teacher)
    lora = _lora_dir(tmp_path, tiny_teacher_dir)
    student = OneStepPipeline.from_teacher(teacher, lora=lora)
    student.set_progress_bar_config(disable=True)
    with_lora = student(**inputs()).images
    np.testing.assert_array_equal(teacher_images(teacher), before)
    assert not hasattr(teacher.unet, "peft_config")
    # memory: the base weights are shared, not copied
    teacher_ptrs = {p.data_ptr() for p in teacher.unet.parameters()}
    base_ptrs = {p.data_ptr() for n, p in student.unet.named_parameters() if "lora_" not in n}
    assert base_ptrs <= teacher_ptrs
    # the adapter changes the student (it is really loaded) ...
    student.unload_lora_weights()
    assert np.abs(student(**inputs()).images - with_lora).max() > 1e-4
    # ... and fusing it never writes into the teacher's weights
    student.load_lora_weights(lora, use_safetensors=True)
    student.fuse_lora()
    np.testing.assert_allclose(student(**inputs()).images, with_lora, atol=1e-5)
    np.testing.assert_array_equal(teacher_images(teacher), before)


def test_adaptive_pipeline_refines_with_the_unaltered_teacher(tmp_path, tiny_teacher_dir):
    from diffusers_onestep import AdaptiveCollabPipeline, CallableOracle

    teacher = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir)
    teacher.set_progress_bar_config(disable=True)
    before = teacher_images(teacher)
    student = OneStepPipeline.from_teacher(teacher, lora=_lora_dir(tmp_path, tiny_teacher_dir))
    oracle = CallableOracle(lambda images, prompts: torch.zeros(len(prompts)))
    pipe = AdaptiveCollabPipeline.from_pipelines(student, teacher, oracle=oracle)
    pipe.set_progress_bar_config(disable=True)
    pipe("a photo of a cat", threshold=1.0, teacher_steps=2, generator=torch.Generator().manual_seed(0))
    assert pipe.teacher.unet is teacher.unet and pipe.student.unet is not teacher.unet
    np.testing.assert_array_equal(teacher_images(teacher), before)


# ---------------------------------------------------------------- 3. diffusers' generic loaders


def test_diffusion_pipeline_and_auto_pipeline_load_a_saved_student(tmp_path):
    pipe = make_pipeline()
    expected = pipe(**inputs()).images
    pipe.save_pretrained(tmp_path)
    for loader in (DiffusionPipeline, AutoPipelineForText2Image):
        loaded = loader.from_pretrained(str(tmp_path))
        assert type(loaded) is OneStepPipeline, loader
        assert isinstance(loaded.scheduler, ConsistencyStudentScheduler)
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(loaded(**inputs()).images, expected, atol=1e-6)
    assert diffusers.OneStepPipeline is OneStepPipeline


def test_auto_pipeline_from_pipe_keeps_our_class():
    pipe = make_pipeline()
    assert type(AutoPipelineForText2Image.from_pipe(pipe)) is OneStepPipeline


# ---------------------------------------------------------------- 4. saving with a LoRA loaded


def test_saving_with_a_lora_loaded_is_refused_and_the_recipe_works(tmp_path):
    pipe = make_pipeline()
    add_lora(pipe.unet)
    expected = pipe(**inputs()).images
    with pytest.raises(ValueError, match="fuse_lora\\(\\); pipe.unload_lora_weights\\(\\)"):
        pipe.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused" / "model_index.json").exists()
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(tmp_path / "fused")
    reloaded = OneStepPipeline.from_pretrained(tmp_path / "fused")
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(reloaded(**inputs()).images, expected, atol=1e-5)
    with pytest.raises(ValueError, match="safe_serialization"):
        pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)


# ---------------------------------------------------------------- 5. every listed scheduler runs

_COMPATIBLE = list(ConsistencyStudentScheduler._compatibles)


@pytest.mark.parametrize("name", _COMPATIBLE)
def test_every_compatible_scheduler_runs(name):
    pipe = make_pipeline()
    scheduler_class = getattr(diffusers, name)
    extra = {"skip_prk_steps": True} if name == "PNDMScheduler" else {}
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **extra)
    for steps in (1, 2):
        out = pipe(**inputs(num_inference_steps=steps, negative_prompt="dog"))
        assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()
        assert out.nfe == len(pipe.scheduler.timesteps)  # one UNet evaluation per scheduler timestep
    # same seed, same output (the generator reaches the stochastic schedulers' `step`)
    first = pipe(**inputs(num_inference_steps=2)).images
    np.testing.assert_array_equal(pipe(**inputs(num_inference_steps=2)).images, first)
    # and our own scheduler comes back from its config
    assert type(ConsistencyStudentScheduler.from_config(pipe.scheduler.config)) is ConsistencyStudentScheduler


def test_pndm_with_prk_warmup_runs_from_four_steps():
    pipe = make_pipeline()
    pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config)
    assert np.isfinite(pipe(**inputs(num_inference_steps=4)).images).all()


@pytest.mark.parametrize("name", [n for n in _COMPATIBLE if n in ("DDPMScheduler", "EulerDiscreteScheduler",
                                                                  "LCMScheduler", "TCDScheduler")])  # fmt: skip
def test_custom_timesteps_on_schedulers_that_take_them(name):
    pipe = make_pipeline()
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    out = pipe(**inputs(timesteps=[999, 499]))
    assert out.nfe == 2 and pipe.scheduler.timesteps.tolist()[:1] == [999]


def test_custom_timesteps_on_a_scheduler_without_them_say_so():
    pipe = make_pipeline()
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="does not accept custom timesteps"):
        pipe(**inputs(timesteps=[999, 499]))


# ---------------------------------------------------------------- 6. callbacks and guidance_scale


def test_callback_state_and_sd_cfg_cutoff_callback():
    pipe = make_pipeline()
    seen = []

    def record(p, i, t, kwargs):
        seen.append((p.num_timesteps, p.guidance_scale, p.do_classifier_free_guidance, kwargs["prompt_embeds"].shape[0]))
        return kwargs

    pipe(**inputs(num_inference_steps=3, guidance_scale=2.0, callback_on_step_end=record,
                  callback_on_step_end_tensor_inputs=["prompt_embeds"]))  # fmt: skip
    assert seen == [(3, 2.0, True, 2)] * 3
    # diffusers' own callback switches CFG off after the first step: 2 + 1 + 1 evaluations
    out = pipe(**inputs(num_inference_steps=3, guidance_scale=2.0,
                        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=0)))  # fmt: skip
    assert out.nfe == 4 and pipe.guidance_scale == 0.0


@pytest.mark.parametrize("scale", [0, 0.0, 1])
def test_guidance_scale_zero_and_one_mean_no_guidance(scale):
    pipe = make_pipeline()
    out = pipe(**inputs(guidance_scale=scale))
    np.testing.assert_array_equal(out.images, pipe(**inputs()).images)
    assert out.nfe == 1


# ---------------------------------------------------------------- 7. StableDiffusionMixin


def test_stable_diffusion_mixin_features():
    pipe = make_pipeline()
    expected = pipe(**inputs()).images
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert np.abs(pipe(**inputs()).images - expected).max() > 0
    pipe.disable_freeu()
    np.testing.assert_allclose(pipe(**inputs()).images, expected, atol=1e-6)
    pipe.fuse_qkv_projections()
    np.testing.assert_allclose(pipe(**inputs()).images, expected, atol=1e-5)
    pipe.unfuse_qkv_projections()
    pipe.vae.enable_slicing()
    batch = pipe(**inputs(num_images_per_prompt=2)).images
    pipe.vae.disable_slicing()
    np.testing.assert_allclose(batch, pipe(**inputs(num_images_per_prompt=2)).images, atol=1e-6)


# ---------------------------------------------------------------- 8. no text encoder, embeddings given


def test_pipeline_without_text_encoder_runs_on_embeddings():
    pipe = make_pipeline()
    embeds = pipe.encode_prompt(["a photo of a cat"], torch.device("cpu"))
    negative = pipe.encode_prompt(["dog"], torch.device("cpu"))
    expected = pipe(**inputs(negative_prompt="dog")).images
    components = {**pipe.components, "text_encoder": None, "tokenizer": None}
    lean = OneStepPipeline(**components, nasa_scale=pipe.config.nasa_scale)
    lean.set_progress_bar_config(disable=True)
    out = lean(**inputs(prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)).images
    np.testing.assert_allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="no `text_encoder`"):
        lean(**inputs())


# ---------------------------------------------------------------- 9. safetensors only, in words


def test_a_bin_only_directory_gets_an_error_in_words(tmp_path):
    make_pipeline().save_pretrained(tmp_path)
    unet_dir = tmp_path / "unet"
    for weights in unet_dir.glob("*.safetensors"):
        weights.unlink()
    (unet_dir / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    for load in (lambda: OneStepPipeline.from_pretrained(tmp_path),
                 lambda: OneStepPipeline.from_teacher(make_pipeline(), unet=str(unet_dir))):  # fmt: skip
        with pytest.raises(ValueError, match=r"only pickled weights.*safetensors only.*UNet2DConditionModel.from_pretrained"):
            load()
    assert not any(f.endswith(".bin") for f in os.listdir(tmp_path / "vae"))


# ---------------------------------------------------------------- issue 9 item 6: the inference edge


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"generator": np.random.default_rng(0)}, "`generator` must be a `torch.Generator`"),
        ({"generator": 0}, "`generator` must be a `torch.Generator`"),
        ({"generator": [torch.Generator(), None], "num_images_per_prompt": 2}, r"entries \[1\]"),
        ({"latents": torch.full((1, 4, 8, 8), float("nan"))}, "`latents` contains NaN"),
        ({"prompt": None, "prompt_embeds": torch.full((1, 16, 32), float("nan"))}, "`prompt_embeds` contains NaN"),
        ({"num_images_per_prompt": 10**8}, "`num_images_per_prompt`=100000000 .* GiB"),
    ],
)
def test_inference_edge_errors_before_any_work(overrides, match, monkeypatch):
    pipe = make_pipeline()
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("UNet ran")))
    with pytest.raises(ValueError, match=match):
        pipe(**inputs(**overrides))


def test_latents_on_another_dtype_are_moved():
    pipe = make_pipeline()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = pipe(**inputs(latents=latents)).images
    np.testing.assert_allclose(pipe(**inputs(latents=latents.double())).images, expected, atol=1e-6)


def test_a_huge_prompt_logs_one_short_warning(caplog):
    import logging

    from diffusers.utils import logging as diffusers_logging

    pipe = make_pipeline()
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            pipe(**inputs(prompt="cat " * 25_000))
    finally:
        diffusers_logging.disable_propagation()
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and len(warnings[0]) < 300, warnings


def test_model_index_records_our_classes(tmp_path):
    make_pipeline().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "OneStepPipeline"
    assert index["scheduler"][1] == "ConsistencyStudentScheduler"
    shutil.rmtree(tmp_path)
