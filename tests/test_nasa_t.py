"""NASA-T (SNOOPI v3) in training/train_pg_swiftbrush.py: `--negative_prompts`, the teacher's and the fake score's
unconditional branches, the student's NASA forward (and backward), resume, SDXL / PixArt, bad input."""

import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from training_scripts import SCRIPTS, TeacherDirs, load_script

import diffusers_onestep.training_utils.negatives as negatives_module
from diffusers_onestep import OneStepPipeline
from diffusers_onestep.attention.nasa import NASAAttnProcessor
from diffusers_onestep.losses import Denoiser, PGSwiftBrushLoss
from diffusers_onestep.training_utils import NegativePromptSampler, TrainingArgumentError, load_negative_prompts


PROMPTS = ["a photo of a cat", "a photo of a dog", "the digit seven", "a handwritten digit", "a pet"]
NEGATIVES = ["seven", "", "the number three", "   ", "a dog"]  # blank lines are ignored
CASE = SCRIPTS[0]  # train_pg_swiftbrush on the SD tiny teacher


@pytest.fixture(scope="module")
def script():
    return load_script(CASE)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("nasa-t")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "negatives.txt").write_text("\n".join(NEGATIVES) + "\n")
    return SimpleNamespace(prompts=str(root / "prompts.txt"), negatives=str(root / "negatives.txt"))


def _argv(teacher, files, out, *extra):
    return CASE.argv(teacher, files.prompts, out, f"--negative_prompts={files.negatives}", *extra)


def _is_nasa(network) -> bool:
    return any(isinstance(p, NASAAttnProcessor) for p in network.attn_processors.values())


def test_load_negative_prompts_and_sampler_draws(files):
    assert load_negative_prompts(files.negatives) == ["seven", "the number three", "a dog"]
    sampler = NegativePromptSampler(["seven", "a dog"], (0.0, 1.0))
    draws = [sampler.sample(4, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(len(n) == 4 and set(n) <= {"seven", "a dog"} and 0 <= a < 1 for n, a in draws)
    assert len({a for _, a in draws}) == 20  # one fresh alpha per iteration
    assert draws[3] == sampler.sample(4, generator=torch.Generator().manual_seed(3))  # the generator's only
    _, alpha = NegativePromptSampler(["x"], (0.25, 0.5)).sample(2, generator=torch.Generator().manual_seed(0))
    assert 0.25 <= alpha < 0.5


class _Recorder:
    """A `Denoiser` stand-in that records the unconditional branch it is given."""

    def __init__(self):
        self.alphas_cumprod, self.unconds = torch.linspace(0.99, 0.01, 1000), []

    def __call__(self, x_t, timesteps, cond, guidance_scale=None, uncond=None):
        self.unconds.append(uncond)
        return SimpleNamespace(eps=torch.zeros_like(x_t))


def test_generator_loss_gives_the_negative_to_the_teacher_only():
    teacher, fake = _Recorder(), _Recorder()
    x0 = torch.randn(2, 4, 8, 8)
    cond, empty = {"encoder_hidden_states": torch.ones(2, 3, 5)}, {"encoder_hidden_states": torch.zeros(1, 3, 5)}
    negative = {"encoder_hidden_states": torch.full((2, 3, 5), 7.0)}
    PGSwiftBrushLoss().generator_loss(teacher, fake, x0, cond, empty, negative_prompt_embeds=negative)
    assert torch.equal(teacher.unconds[0]["encoder_hidden_states"], negative["encoder_hidden_states"])
    assert torch.equal(fake.unconds[0]["encoder_hidden_states"], torch.zeros(2, 3, 5))
    PGSwiftBrushLoss().generator_loss(teacher, fake, x0, cond, empty)  # PG-SB: both get the empty prompt
    assert torch.equal(teacher.unconds[1]["encoder_hidden_states"], torch.zeros(2, 3, 5))


def test_nasa_t_run_saves_a_loadable_student_and_its_card_says_nasa_t(script, tiny_teacher_dir, files, tmp_path):
    out = tmp_path / "nasa-t"
    trained = script.main(_argv(tiny_teacher_dir, files, out, "--max_train_steps=2"))
    reloaded = OneStepPipeline.from_pretrained(out)

    def sample(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe("a photo of a cat", negative_prompt="seven", nasa_scale=0.5, generator=generator,
                    output_type="pt").images  # fmt: skip

    torch.testing.assert_close(sample(reloaded), sample(trained))
    card = ModelCard.load(out / "README.md")
    assert "nasa-t" in card.data.tags and "with NASA-T" in card.text
    assert "| nasa_t_negative_prompts | 3 |" in card.text and "| nasa_t_scale_range | (0, 1) |" in card.text
    assert "| guidance_scale | (0.5, 4) |" in card.text and "| nasa_scale |" in card.text  # the last alpha drawn
    assert "--negative_prompts" in card.text


def test_teacher_uncond_is_the_negative_and_the_fake_score_keeps_the_empty_prompt(
    script, tiny_teacher_dir, files, tmp_path, monkeypatch
):
    calls, drawn = [], []
    original_call, original_sample = Denoiser.__call__, NegativePromptSampler.sample

    def recording_call(self, sample, timesteps, cond, guidance_scale=None, uncond=None, **kwargs):
        if guidance_scale is not None:  # the two guided calls of the student loss
            calls.append((self.unet.adapter_name, uncond["encoder_hidden_states"].detach().clone()))
        return original_call(self, sample, timesteps, cond, guidance_scale, uncond, **kwargs)

    def recording_sample(self, *args, **kwargs):
        negatives, alpha = original_sample(self, *args, **kwargs)
        drawn.append(negatives)
        return negatives, alpha

    monkeypatch.setattr(Denoiser, "__call__", recording_call)
    monkeypatch.setattr(NegativePromptSampler, "sample", recording_sample)
    script.main(_argv(tiny_teacher_dir, files, tmp_path / "run", "--max_train_steps=2"))

    # the hand check: diffusers' own StableDiffusionPipeline.encode_prompt of the drawn negatives and of ""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir)

    def encode(texts):
        return pipe.encode_prompt(texts, "cpu", 1, do_classifier_free_guidance=False)[0]

    assert [name for name, _ in calls] == [None, "fake_score"] * 2  # teacher (adapters off), then the fake score
    assert all(set(n) <= {"seven", "the number three", "a dog"} for n in drawn) and len(drawn) == 2
    empty = encode([""])
    for step, negatives in enumerate(drawn):
        teacher_uncond, fake_uncond = calls[2 * step][1], calls[2 * step + 1][1]
        torch.testing.assert_close(teacher_uncond, encode(negatives))
        torch.testing.assert_close(fake_uncond, empty.expand_as(fake_uncond))
        assert (teacher_uncond - fake_uncond).abs().max() > 1e-3


def test_student_runs_nasa_with_one_alpha_per_iteration_and_the_scores_never_do(
    script, tiny_teacher_dir, files, tmp_path, monkeypatch
):
    # a LoRA student: student, teacher and fake score are one UNet, so NASA must be installed only around the student
    entered, student_calls, score_calls = [], [], []
    original_nasa, original_generate, original_call = (
        negatives_module.nasa_attention, script.student_generate, Denoiser.__call__
    )  # fmt: skip

    def recording_nasa(model, features, scale, **kwargs):
        entered.append((model, features, scale))
        return original_nasa(model, features, scale, **kwargs)

    def recording_generate(unet, *args, **kwargs):
        scales = {p.scale for p in unet.base.attn_processors.values() if isinstance(p, NASAAttnProcessor)}
        student_calls.append(scales)
        return original_generate(unet, *args, **kwargs)

    def recording_call(self, *args, **kwargs):  # every network call: the student's, the teacher's, the fake score's
        score_calls.append((self.unet.adapter_name, _is_nasa(self.unet.base)))
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(negatives_module, "nasa_attention", recording_nasa)
    monkeypatch.setattr(script, "student_generate", recording_generate)
    monkeypatch.setattr(Denoiser, "__call__", recording_call)
    trained = script.main(_argv(tiny_teacher_dir, files, tmp_path / "run", "--max_train_steps=3", "--student_lora_rank=2"))

    assert len(entered) == 6  # per iteration: the student's forward and its backward
    alphas = [scale for _, _, scale in entered]
    assert alphas[0::2] == alphas[1::2] and len(set(alphas[0::2])) == 3  # one alpha per iteration, fresh each time
    assert all(isinstance(a, float) and 0 <= a < 1 for a in alphas)
    assert student_calls == [{a} for a in alphas[0::2]]  # every cross-attention layer of the student had NASA at it
    # the student's own call ran with NASA; the teacher's and both fake-score calls with the stock processors
    assert [(name, nasa) for name, nasa in score_calls if name == "student"] == [("student", True)] * 3
    assert sorted({name for name, nasa in score_calls if not nasa}, key=str) == [None, "fake_score"]
    assert all(not nasa for name, nasa in score_calls if name != "student") and len(score_calls) == 3 * 4
    assert all(model is trained.unet for model, _, _ in entered) and not _is_nasa(trained.unet)
    # the negative features are the negatives' text embeddings, one per sample
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir)
    negatives = [pipe.encode_prompt([n], "cpu", 1, False)[0] for n in ("seven", "the number three", "a dog")]
    for _, features, _ in entered:
        assert features.shape[0] == 2
        assert all(any(torch.allclose(row, n[0]) for n in negatives) for row in features)


def test_nasa_t_gradient_checkpointing_matches_and_resume_is_exact(script, tiny_teacher_dir, files, tmp_path):
    def weights(out):
        return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")

    # checkpointing recomputes the student's forward in backward: with NASA, or the gradient would differ
    script.main(_argv(tiny_teacher_dir, files, tmp_path / "plain", "--max_train_steps=1"))
    script.main(_argv(tiny_teacher_dir, files, tmp_path / "ckpt", "--max_train_steps=1", "--gradient_checkpointing"))
    plain, ckpt = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)

    # negatives and alpha come from the (seed, micro-step) generator: a resumed run equals an uninterrupted one
    script.main(_argv(tiny_teacher_dir, files, tmp_path / "straight", "--max_train_steps=3", "--checkpointing_steps=2"))
    resumed = tmp_path / "resumed"
    script.main(_argv(tiny_teacher_dir, files, resumed, "--max_train_steps=2", "--checkpointing_steps=2"))
    script.main(_argv(tiny_teacher_dir, files, resumed, "--max_train_steps=3", "--checkpointing_steps=2",
                      "--resume_from_checkpoint=latest"))  # fmt: skip
    straight, again = weights(tmp_path / "straight"), weights(resumed)
    assert all(torch.equal(again[name], straight[name]) for name in straight)


@pytest.mark.parametrize("backbone", ["sdxl", "pixart"])
def test_nasa_t_on_sdxl_and_pixart(script, files, tmp_path_factory, tmp_path, monkeypatch, backbone):
    teacher = TeacherDirs(tmp_path_factory.mktemp("teachers"))[backbone]
    entered, original = [], negatives_module.nasa_attention
    monkeypatch.setattr(negatives_module, "nasa_attention",
                        lambda model, features, scale, **kw: entered.append((model, features, kw)) or original(
                            model, features, scale, **kw))  # fmt: skip
    trained = script.main(_argv(teacher, files, tmp_path / "run", "--max_train_steps=1"))
    network = trained.transformer if backbone == "pixart" else trained.unet
    model, features, kwargs = entered[0]
    assert model is network and not _is_nasa(network)
    if backbone == "pixart":  # the negative went through the student's caption projection, with its T5 mask
        assert features.shape[-1] == network.config.num_attention_heads * network.config.attention_head_dim
        assert features.requires_grad and kwargs["negative_attention_mask"] is not None
    else:
        assert features.shape[-1] == network.config.cross_attention_dim
    assert os.path.isfile(tmp_path / "run" / "model_index.json")


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--negative_prompts=/no/such/negatives.txt"], "`--negative_prompts` '/no/such/negatives.txt': no such file"),
        (["--negative_prompts={empty}"], "`--negative_prompts` .*holds no negative prompts"),
        (["--negative_prompts={binary}"], "`--negative_prompts` .*is not UTF-8 text"),
        (["--negative_prompts={dir}"], "`--negative_prompts` .*: no such file"),
        (["--negative_prompts={good}", "--nasa_scale_min=0.8", "--nasa_scale_max=0.2"], "`--nasa_scale_min` <= `--nasa_"),
        (["--negative_prompts={good}", "--nasa_scale_max=-1"], "`--nasa_scale_max` must be >= 0, got -1"),
    ],
)
def test_bad_negative_prompts_fail_before_any_work(script, tiny_teacher_dir, files, tmp_path, flags, match):
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00seven")
    paths = {"empty": tmp_path / "empty.txt", "binary": tmp_path / "binary.txt", "dir": tmp_path, "good": files.negatives}
    out = tmp_path / "out"
    argv = CASE.argv(tiny_teacher_dir, files.prompts, out, *(f.format(**paths) for f in flags))
    with pytest.raises(TrainingArgumentError, match=match):
        script.main(argv)
    assert not out.exists()
