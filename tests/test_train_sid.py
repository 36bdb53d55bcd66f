"""training/train_sid.py (SiD / SiD-LSG): presets, both fake-score modes, the fake score frozen for the generator's
step, bad input. Kill / resume, NaN, Hub and token faults: the shared table (tests/training_scripts.py)."""

import os

import pytest
import torch
from safetensors.torch import load_file
from training_scripts import SCRIPTS, load_script

import diffusers_onestep.losses.sid as sid_module
from diffusers_onestep import OneStepPipeline
from diffusers_onestep.training_utils import TrainingArguments, parse_args


CASE = next(c for c in SCRIPTS if c.name == "train_sid" and c.backbone == "sd")


@pytest.fixture(scope="module")
def script():
    return load_script(CASE)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a photo of a cat\na photo of a dog\nthe digit seven\n")
    return str(path)


def test_presets_are_sid_lsgs_official_defaults(script, prompts_file, tmp_path):
    common = [f"--output_dir={tmp_path / 'out'}", f"--train_prompts={prompts_file}"]
    args, sid = parse_args((TrainingArguments, script.SiDArguments), ["--preset=sd15-sid-lsg", *common])
    assert (args.t_init, args.input_type, args.adam_beta1, args.adam_beta2) == (625, "scaled_noise", 0.0, 0.999)
    assert (args.learning_rate, sid.fake_score_learning_rate, sid.alpha, sid.guidance_scale) == (1e-6, 1e-6, 1.0, 1.5)
    assert sid.fake_score_lora_rank == 0 and args.mixed_precision == "no" and args.use_ema
    with pytest.raises(ValueError, match="does not define"):  # a PG-SB preset names flags SiD does not have
        parse_args((TrainingArguments, script.SiDArguments), ["--preset=sd15-pgsb", *common])


@pytest.mark.parametrize(
    "flags, match",
    [(["--min_timestep=900", "--max_timestep=100"], "--min_timestep"), (["--guidance_scale=-1"], "guidance_scale"),
     (["--fake_score_lora_rank=-2"], "fake_score_lora_rank"), (["--alpha=nan"], "alpha")],
)  # fmt: skip
def test_bad_flags_are_refused_before_any_work(script, tiny_teacher_dir, prompts_file, tmp_path, flags, match, capsys):
    with pytest.raises((ValueError, SystemExit)) as error:
        script.main(CASE.argv(tiny_teacher_dir, prompts_file, tmp_path / "out", *flags))
    message = capsys.readouterr().err if error.type is SystemExit else str(error.value)  # argparse prints, exits
    assert match in message, message
    assert not (tmp_path / "out").exists()


def test_full_fake_score_is_checkpointed_and_frozen_during_the_generator_step(
    script, tiny_teacher_dir, prompts_file, tmp_path, monkeypatch
):
    seen = []
    original = sid_module.SiDLoss.generator_loss

    def spy(self, teacher, fake_score, *args, **kwargs):
        fake = fake_score.unet.base
        seen.append((any(p.requires_grad for p in fake.parameters()), any(p.grad is not None for p in fake.parameters())))
        return original(self, teacher, fake_score, *args, **kwargs)

    monkeypatch.setattr(sid_module.SiDLoss, "generator_loss", spy)
    out = tmp_path / "out"
    pipe = script.main(CASE.argv(tiny_teacher_dir, prompts_file, out, "--max_train_steps=2", "--checkpointing_steps=2",
                                 "--use_ema", *CASE.flags))  # fmt: skip
    assert seen == [(False, False), (False, False)]  # frozen, and its own step's gradients already cleared
    # the checkpoint holds the student, the fake score's full copy and the EMA
    checkpoint = out / "checkpoint-2"
    files = sorted(os.listdir(checkpoint))
    assert "ema.safetensors" in files and "trainable_2.safetensors" in files
    teacher_unet_params = sum(p.numel() for p in pipe.unet.parameters())
    fake = load_file(checkpoint / "trainable_2.safetensors")
    assert sum(t.numel() for t in fake.values()) == teacher_unet_params
    loaded = OneStepPipeline.from_pretrained(out)
    assert loaded.scheduler.config.t_init == 999
    image = loaded("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(image).all()


def test_lora_fake_score_memory_mode_trains_and_saves(script, tiny_teacher_dir, prompts_file, tmp_path):
    out = tmp_path / "out"
    script.main(CASE.argv(tiny_teacher_dir, prompts_file, out, "--max_train_steps=2", "--checkpointing_steps=2",
                          "--fake_score_lora_rank=4", "--student_lora_rank=4", "--t_init=625",
                          "--input_type=scaled_noise"))  # fmt: skip
    checkpoint = out / "checkpoint-2"
    # LoRA student and LoRA fake score on one shared frozen base: one prepared module, only adapter weights saved
    state = load_file(checkpoint / "trainable_0.safetensors")
    assert state and all("lora" in name for name in state)
    assert any("fake_score" in name for name in state) and any("student" in name for name in state)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "SiD-LSG" in card and "OneStepPipeline.from_teacher(" in card
