import copy
import glob
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from peft import LoraConfig

from diffusers_onestep.pipelines.calibration import OracleCalibration
from diffusers_onestep.pipelines.oracles import CallableOracle
from diffusers_onestep.pipelines.pipeline_adaptive_collab import AdaptiveCollabPipeline
from diffusers_onestep.pipelines.pipeline_onestep import OneStepPipeline
from diffusers_onestep.schedulers.scheduling_consistency_student import ConsistencyStudentScheduler
from diffusers_onestep.testing_utils import get_dummy_components, get_dummy_teacher_components
from tests.pipeline_mixins import PipelineChecksMixin


TEACHER_STEPS, STRENGTH, CFG = 2, 0.5, 4.0
PROMPTS = ["a photo of a cat", "a photo of a dog", "the digit seven", "a pet"]


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def likes_cats(images, prompts):
    """Decisions that no rounding can flip: 1 for prompts with "cat", else 0."""
    return torch.tensor([float("cat" in p) for p in prompts])


def make_pipeline(oracle=brightness, student="onestep"):
    teacher = StableDiffusionPipeline(**get_dummy_teacher_components(seed=0))
    student_unet = get_dummy_components(seed=1)["unet"]
    if student == "onestep":
        student = OneStepPipeline.from_teacher(teacher, unet=student_unet)
    else:  # a diffusers LCM-style student sharing the teacher's VAE, text encoder and tokenizer
        student = StableDiffusionPipeline(
            **{
                **teacher.components,
                "unet": student_unet,
                "scheduler": LCMScheduler.from_config(teacher.scheduler.config),
            },
            requires_safety_checker=False,
        )
    pipe = AdaptiveCollabPipeline.from_pipelines(student, teacher, oracle=CallableOracle(oracle))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_pipeline(pipeline_class, pipe):
    teacher = pipeline_class(**pipe.teacher.components, requires_safety_checker=False)
    teacher.set_progress_bar_config(disable=True)
    return teacher


def generators(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def call(pipe, prompts=PROMPTS, **kwargs):
    kwargs = {"teacher_steps": TEACHER_STEPS, "refine_strength": STRENGTH, "teacher_guidance_scale": CFG,
              "generator": generators(len(prompts)), "output_type": "np", **kwargs}  # fmt: skip
    return pipe(prompts, **kwargs)


def student_alone(pipe, prompts=PROMPTS, **kwargs):
    return pipe.student(prompts, generator=generators(len(prompts)), output_type="np", **kwargs).images


class TestAdaptiveCollabPipelineChecks(PipelineChecksMixin):
    def get_pipeline(self):
        return make_pipeline(oracle=likes_cats)

    def get_inputs(self, seed=0):
        # "a photo of a dog" (used by the batch check) scores 0 and is refined; the cat is kept
        return {"prompt": "a photo of a cat", "generator": torch.Generator().manual_seed(seed), "threshold": 0.5,
                "teacher_steps": TEACHER_STEPS, "refine_strength": STRENGTH, "output_type": "np"}  # fmt: skip

    def test_save_load_round_trip(self, tmp_path):
        pipe = self.get_pipeline()
        inputs = {**self.get_inputs(), "prompt": PROMPTS, "generator": generators(4)}
        expected = pipe(**inputs)
        assert expected.refined.tolist() == [False, True, True, True]
        pipe.save_pretrained(tmp_path)
        reloaded = AdaptiveCollabPipeline.from_pretrained(tmp_path, oracle=pipe.oracle)
        reloaded.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(
            reloaded(**{**inputs, "generator": generators(4)}).images, expected.images, atol=1e-6
        )


def test_decisions_follow_the_threshold_exactly():
    pipe = make_pipeline()
    scores = brightness(torch.from_numpy(student_alone(pipe)).permute(0, 3, 1, 2), PROMPTS)
    tau = float(scores.sort().values[1])  # the second-lowest score: one image below, one exactly at tau
    out = call(pipe, threshold=tau)
    torch.testing.assert_close(out.scores, scores, rtol=0, atol=0)
    assert out.refined.tolist() == (scores < tau).tolist() and out.refined.sum() == 1  # score == tau is kept
    assert out.threshold == tau
    assert call(pipe, threshold=float(scores.max()) + 1e-3).refined.all()
    assert not call(pipe, threshold=float(scores.min())).refined.any()


def test_kept_images_are_the_students_and_refined_ones_the_teachers():
    pipe = make_pipeline(oracle=likes_cats)
    out = call(pipe, threshold=0.5)
    assert out.refined.tolist() == [False, True, True, True]
    student = student_alone(pipe)
    np.testing.assert_array_equal(out.images[0], student[0])  # bit for bit
    assert all(np.abs(out.images[i] - student[i]).max() > 1e-3 for i in (1, 2, 3))

    # refined == diffusers' img2img from the student's latents at strength sigma, with the images' own generators
    latents = pipe.student(PROMPTS[1:], generator=generators(3, offset=1), output_type="latent").images
    img2img = sd_pipeline(StableDiffusionImg2ImgPipeline, pipe)
    generator = generators(4)[1:]
    for g in generator:  # each image's generator already drew the student's initial noise
        torch.randn(1, 4, 8, 8, generator=g)
    expected = img2img(PROMPTS[1:], image=latents, strength=STRENGTH, num_inference_steps=4, guidance_scale=CFG,
                       generator=generator, output_type="np").images  # fmt: skip
    np.testing.assert_allclose(out.images[1:], expected, atol=1e-6)


def test_regenerate_runs_the_teacher_from_the_same_initial_noise():
    pipe = make_pipeline(oracle=likes_cats)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    out = call(pipe, threshold=0.5, strategy="regenerate", latents=noise)
    teacher = sd_pipeline(StableDiffusionPipeline, pipe)
    expected = teacher(PROMPTS[1:], latents=noise[1:], num_inference_steps=TEACHER_STEPS, guidance_scale=CFG,
                       generator=generators(4)[1:], output_type="np").images  # fmt: skip
    np.testing.assert_allclose(out.images[1:], expected, atol=1e-6)
    np.testing.assert_array_equal(out.images[0], pipe.student(PROMPTS, latents=noise, output_type="np").images[0])


@pytest.mark.parametrize("strategy", ["refine", "regenerate"])
@pytest.mark.parametrize("guidance", [1.0, CFG])
def test_nfe_accounting_is_exact(strategy, guidance):
    pipe = make_pipeline(oracle=likes_cats)
    out = call(pipe, threshold=0.5, strategy=strategy, teacher_guidance_scale=guidance, teacher_steps=3)
    teacher_nfe = 3 * (2 if guidance > 1 else 1)  # what ran: 3 steps, two UNet evaluations per CFG step
    assert out.nfe == [1, 1 + teacher_nfe, 1 + teacher_nfe, 1 + teacher_nfe]
    assert out.average_nfe == pytest.approx(1 + 0.75 * teacher_nfe)


@pytest.mark.parametrize("teacher_steps, strength", [(12, 0.7), (3, 0.3), (5, 1.0), (7, 0.33)])
def test_img2img_runs_exactly_teacher_steps(teacher_steps, strength):
    from diffusers_onestep.pipelines.pipeline_adaptive_collab import _img2img_steps

    steps = _img2img_steps(teacher_steps, strength)
    assert int(steps * strength) == teacher_steps and int((steps - 1) * strength) < teacher_steps


def test_percentile_0_refines_nothing_and_100_everything():
    pipe = make_pipeline()
    pipe.calibrate(PROMPTS, batch_size=4, generator=torch.Generator().manual_seed(0))
    none = call(pipe, percentile=0)
    assert not none.refined.any() and none.nfe == [1] * 4 and none.threshold == -math.inf
    np.testing.assert_array_equal(none.images, student_alone(pipe))
    every = call(pipe, percentile=100, teacher_guidance_scale=1.0)
    assert every.refined.all() and every.nfe == [1 + TEACHER_STEPS] * 4 and every.threshold == math.inf


def test_calibration_percentiles_and_save_load_round_trip(tmp_path):
    pipe = make_pipeline()
    scores = pipe.calibrate(PROMPTS + ["a dog", "seven"], batch_size=4, generator=torch.Generator().manual_seed(0))
    assert scores.shape == (6,)
    assert isinstance(pipe.calibration, OracleCalibration)
    percentiles = np.array(pipe.calibration.percentiles)
    np.testing.assert_allclose(percentiles, np.percentile(scores.double().numpy(), np.arange(101)))
    assert pipe.calibration.num_samples == 6 and pipe.calibration.oracle == "CallableOracle"
    assert pipe.get_threshold(30) == percentiles[30]
    assert pipe.get_threshold(12.5) == pytest.approx((percentiles[12] + percentiles[13]) / 2)
    assert call(pipe).threshold == percentiles[50]  # 50 by default once calibrated
    expected = call(pipe, percentile=30)
    assert expected.threshold == percentiles[30]

    pipe.save_pretrained(tmp_path)
    with open(tmp_path / "calibration.json") as file:  # the format of calibration.json
        assert json.load(file) == {"percentiles": list(percentiles), "num_samples": 6, "oracle": "CallableOracle"}
    # student/ and teacher/ are each pipeline's own folder; modules shared with the student are stored once, in student/
    shared = ["text_encoder", "tokenizer", "vae"]
    assert AdaptiveCollabPipeline.load_config(tmp_path)["_shared_with_student"] == shared
    assert all((tmp_path / "student" / name).is_dir() and not (tmp_path / "teacher" / name).exists() for name in shared)
    assert (tmp_path / "teacher" / "unet").is_dir() and (tmp_path / "teacher" / "model_index.json").is_file()
    assert glob.glob(str(tmp_path / "**" / "*.safetensors"), recursive=True)
    assert not glob.glob(str(tmp_path / "**" / "*.bin"), recursive=True)
    reloaded = AdaptiveCollabPipeline.from_pretrained(tmp_path, oracle=pipe.oracle)
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.calibration == pipe.calibration
    assert all(getattr(reloaded.teacher, name) is getattr(reloaded.student, name) for name in shared)
    assert type(reloaded.teacher) is StableDiffusionPipeline
    assert isinstance(reloaded.student, OneStepPipeline)
    assert isinstance(reloaded.student.scheduler, ConsistencyStudentScheduler)
    out = call(reloaded, percentile=30)
    np.testing.assert_allclose(out.images, expected.images, atol=1e-6)
    assert out.refined.tolist() == expected.refined.tolist() and out.threshold == expected.threshold

    # no oracle after loading: a clear error; a stale calibration is removed by the next save
    with pytest.raises(ValueError, match="no oracle"):
        call(AdaptiveCollabPipeline.from_pretrained(tmp_path), percentile=30)
    reloaded.calibration = None
    reloaded.save_pretrained(tmp_path)
    assert not os.path.exists(tmp_path / "calibration.json")


def test_diffusers_lcm_student_and_its_nfe(tmp_path):
    pipe = make_pipeline(oracle=likes_cats, student="lcm")
    student_kwargs = {"guidance_scale": 1.0}
    out = call(pipe, threshold=0.5, student_steps=2, student_kwargs=student_kwargs)
    assert out.nfe == [2] + [2 + TEACHER_STEPS * 2] * 3
    alone = student_alone(pipe, num_inference_steps=2, **student_kwargs)
    np.testing.assert_array_equal(out.images[0], alone[0])
    pipe.save_pretrained(tmp_path)
    reloaded = AdaptiveCollabPipeline.from_pretrained(tmp_path, oracle=pipe.oracle)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.student) is StableDiffusionPipeline and reloaded.student.vae is reloaded.teacher.vae
    again = call(reloaded, threshold=0.5, student_steps=2, student_kwargs=student_kwargs)
    np.testing.assert_allclose(again.images, out.images, atol=1e-6)


def test_lora_student_on_the_teacher_unet_refines_with_the_base_weights():
    teacher = StableDiffusionPipeline(**get_dummy_teacher_components(seed=0))
    base = copy.deepcopy(teacher.unet)
    torch.manual_seed(3)
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    teacher.unet.add_adapter(lora)
    # the student is the teacher's UNet object plus a LoRA adapter (what OneStepPipeline.from_teacher(lora=...) gives)
    student = OneStepPipeline.from_teacher(teacher, unet=teacher.unet)
    oracle = CallableOracle(likes_cats)
    shared = AdaptiveCollabPipeline.from_pipelines(student, teacher, oracle=oracle)
    separate = AdaptiveCollabPipeline(student=student, teacher=StableDiffusionPipeline.from_pipe(teacher, unet=base),
                                      oracle=oracle)  # fmt: skip
    for pipe in (shared, separate):
        pipe.set_progress_bar_config(disable=True)
    before = student_alone(shared)
    np.testing.assert_allclose(call(shared, threshold=0.5).images, call(separate, threshold=0.5).images, atol=1e-6)
    np.testing.assert_array_equal(student_alone(shared), before)  # the adapter is back on for the student


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"percentile": -1}, r"`percentile` must be a number in \[0, 100\]"),
        ({"percentile": 100.5}, r"`percentile` must be a number in \[0, 100\]"),
        ({"percentile": 50, "threshold": 0.1}, "at most one of `percentile` or `threshold`"),
        ({}, "not calibrated: pass an explicit `threshold`"),
        ({"percentile": 50}, "`percentile` needs a calibration"),
        ({"threshold": float("nan")}, "`threshold` must be a number"),
        ({"threshold": 0.5, "refine_strength": 0.0}, r"`refine_strength` \(SDEdit sigma\) must be in \(0, 1\]"),
        ({"threshold": 0.5, "refine_strength": 1.2}, r"`refine_strength` \(SDEdit sigma\) must be in \(0, 1\]"),
        ({"threshold": 0.5, "teacher_steps": 0}, "`teacher_steps` must be an integer >= 1"),
        ({"threshold": 0.5, "teacher_steps": 2.5}, "`teacher_steps` must be an integer >= 1"),
        ({"threshold": 0.5, "teacher_steps": 12, "refine_strength": 0.01}, "more than the teacher scheduler's 1000"),
        ({"threshold": 0.5, "strategy": "upscale"}, r"`strategy` must be one of \('refine', 'regenerate'\)"),
        ({"threshold": 0.5, "teacher_guidance_scale": 0.5}, "`teacher_guidance_scale` must be a finite number >= 1"),
        ({"threshold": 0.5, "output_type": "jpg"}, "`output_type` must be one of"),
        ({"threshold": 0.5, "negative_prompt": ["cat"]}, "`negative_prompt` has batch size 1 but `prompt` has 4"),
        ({"threshold": 0.5, "generator": generators(2)}, "`generator` is a list of 2 generators; expected 4"),
        ({"threshold": 0.5, "student_kwargs": {"latents": None}}, r"`student_kwargs` must not set \['latents'\]"),
        ({"threshold": 0.5, "teacher_kwargs": {"strength": 0.3}}, r"`teacher_kwargs` must not set \['strength'\]"),
        ({"threshold": 0.5, "student_steps": 0}, "`student_steps` must be an integer >= 1"),
        ({"threshold": 0.5, "num_images_per_prompt": 0}, "`num_images_per_prompt` must be an integer >= 1"),
        ({"threshold": 0.5, "height": 15}, "`height` must be a positive multiple of 2, got 15"),  # the VAE's factor
        ({"threshold": 0.5, "latents": torch.zeros(4, 4, 4, 4)}, r"`latents` has shape \(4, 4, 4, 4\); expected"),
        ({"threshold": 0.5, "student_kwargs": 3}, "`student_kwargs` must be a dict"),
    ],
)
def test_validation_errors_come_before_any_work(kwargs, match):
    pipe = make_pipeline()
    evaluations = []
    for unet in (pipe.teacher.unet, pipe.student.unet):
        unet.register_forward_pre_hook(lambda *args: evaluations.append(1))
    with pytest.raises(ValueError, match=match):
        pipe(PROMPTS, **kwargs)
    assert not evaluations


def test_other_errors():
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="`prompt` must be a `str` or a non-empty `list\\[str\\]`"):
        pipe(None, threshold=0.5)
    pipe.oracle = None
    with pytest.raises(ValueError, match="no oracle"):
        pipe(PROMPTS, threshold=0.5)
    with pytest.raises(ValueError, match="no oracle"):
        pipe.calibrate(PROMPTS)
    with pytest.raises(ValueError, match="`student` must be a diffusers text-to-image pipeline"):
        AdaptiveCollabPipeline(student=None, teacher=pipe.teacher)
    with pytest.raises(ValueError, match="`teacher` must be a diffusers text-to-image pipeline"):
        AdaptiveCollabPipeline(student=pipe.student, teacher=pipe.teacher.unet)
    pipe.oracle = CallableOracle(lambda images, prompts: torch.zeros(len(prompts) + 1))
    with pytest.raises(ValueError, match="one score per image"):
        pipe(PROMPTS, threshold=0.5)


def test_image_size_follows_the_vae_factor():
    pipe = make_pipeline(oracle=likes_cats)
    assert pipe.vae_scale_factor == 2  # the tiny VAE has two levels: sizes need not be multiples of 8
    out = call(pipe, threshold=0.5, height=12, width=20)
    assert out.images.shape == (4, 12, 20, 3) and out.refined.tolist() == [False, True, True, True]


def test_oracle_calibration_percentiles_thresholds_save_load(tmp_path):
    scores = torch.tensor([3.0, float("nan"), 1.0, 2.0, float("inf")])
    calibration = OracleCalibration.from_scores(scores, oracle="CallableOracle")  # non-finite scores are left out
    assert calibration.num_samples == 3 and calibration.percentiles[0] == 1.0 and calibration.percentiles[100] == 3.0
    assert calibration.threshold(50) == 2.0 and calibration.threshold(25) == 1.5 and calibration.threshold(12.5) == 1.25
    assert calibration.threshold(0) == -math.inf and calibration.threshold(100) == math.inf
    assert calibration["percentiles"] == calibration.percentiles  # reads like calibration.json
    assert OracleCalibration.load(tmp_path) is None
    calibration.save(tmp_path)
    assert OracleCalibration.load(tmp_path) == calibration
    with pytest.raises(ValueError, match=r"`percentile` must be a number in \[0, 100\]"):
        calibration.threshold(101)
    with pytest.raises(ValueError, match="no finite score"):
        OracleCalibration.from_scores(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="101 finite numbers"):
        OracleCalibration(percentiles=[0.0] * 100, num_samples=1)


def test_from_pretrained_refuses_what_it_cannot_load(tmp_path):
    pipe = make_pipeline()
    pipe.student.save_pretrained(tmp_path / "onestep")
    with pytest.raises(ValueError, match="is not an `AdaptiveCollabPipeline` directory"):
        AdaptiveCollabPipeline.from_pretrained(tmp_path / "onestep")
    with pytest.raises(ValueError, match=r"unknown arguments \['vae'\]"):
        AdaptiveCollabPipeline.from_pretrained(tmp_path / "onestep", vae=pipe.teacher.vae)
    with pytest.raises(ValueError, match="`use_safetensors` must be True"):
        AdaptiveCollabPipeline.from_pretrained(tmp_path / "onestep", use_safetensors=False)
    with pytest.raises(ValueError, match="`safe_serialization` must be True"):
        pipe.save_pretrained(tmp_path / "pickled", safe_serialization=False)


def test_example_runs_offline(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "adaptive_collab_example", os.path.join(os.path.dirname(__file__), "..", "examples", "adaptive_collab.py")
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--tiny", "--output_dir", str(tmp_path)])
    assert not any(results[0]["refined"]) and all(results[100]["refined"])
    assert results[0]["average_nfe"] == 1 and results[100]["average_nfe"] == 1 + 2 * 2
    assert (tmp_path / "pipeline" / "calibration.json").is_file()
