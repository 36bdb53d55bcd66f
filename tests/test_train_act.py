"""training/train_act.py (ACT, and plain CT at lambda 0): the batch split, D frozen for the student's step, the EMA decay
tied to N(k), the discriminator checkpointed, the LoRA student, presets, bad input. Kill / resume, NaN, Hub and token
faults: the shared table (tests/training_scripts.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from training_scripts import SCRIPTS, load_script

import diffusers_onestep.losses.act as act_module
from diffusers_onestep import OneStepPipeline
from diffusers_onestep.losses import ct_bins, ct_ema_decay
from diffusers_onestep.training_utils import TrainingArguments, parse_args


CASE = next(c for c in SCRIPTS if c.name == "train_act" and c.backbone == "sd")
PROMPTS = ["a photo of a cat", "a photo of a dog", "the digit seven", "a pet"]


@pytest.fixture(scope="module")
def script():
    return load_script(CASE)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def _spy(monkeypatch, name):
    seen, original = [], getattr(act_module.ACTLoss, name)

    def spy(self, *args, **kwargs):
        seen.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(act_module.ACTLoss, name, spy)
    return seen


def test_act_splits_the_batch_freezes_d_for_the_student_and_checkpoints_d(
    script, tiny_teacher_dir, prompts_file, tmp_path, monkeypatch
):
    frozen = []
    d_calls, original = _spy(monkeypatch, "discriminator_loss"), act_module.ACTLoss.generator_loss

    def check_frozen(self, student, discriminator, *args, **kwargs):
        frozen.append(not any(p.requires_grad for p in discriminator.parameters()))
        return original(self, student, discriminator, *args, **kwargs)

    monkeypatch.setattr(act_module.ACTLoss, "generator_loss", check_frozen)
    out = tmp_path / "act"
    script.main(CASE.argv(tiny_teacher_dir, prompts_file, out, "--max_train_steps=2", "--checkpointing_steps=2"))
    assert frozen == [True, True]
    # D's step: a quarter of the batch of 4 as fakes, a quarter as reals; R1 on the steps divisible by 2
    assert [args[1].shape[0] for args, _ in d_calls] == [1, 1] and [args[4].shape[0] for args, _ in d_calls] == [1, 1]
    assert [kwargs["r1"] for _, kwargs in d_calls] == [True, False]
    checkpoint = out / "checkpoint-2"
    discriminator = load_file(checkpoint / "trainable_1.safetensors")
    assert any("to_logit" in name for name in discriminator) and (checkpoint / "optimizer_1.bin").is_file()
    # the EMA target's decay is mu(N(k)) of the last step (k = 1 of 2)
    ema = json.loads((checkpoint / "ema.json").read_text())
    assert ema["decay"] == pytest.approx(ct_ema_decay(ct_bins(1, 2)))
    pipe = OneStepPipeline.from_pretrained(out)
    assert torch.isfinite(pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="pt").images).all()
    assert "ACT" in (out / "README.md").read_text()


def test_lambda_zero_is_plain_ct_on_the_whole_batch_without_a_discriminator(
    script, tiny_teacher_dir, prompts_file, tmp_path, monkeypatch
):
    g_calls, d_calls = _spy(monkeypatch, "generator_loss"), _spy(monkeypatch, "discriminator_loss")
    out = tmp_path / "ct"
    argv = [a for a in CASE.argv(tiny_teacher_dir, prompts_file, out) if a not in CASE.flags[1:]]
    script.main([*argv, "--adversarial_weight=0", "--max_train_steps=2", "--checkpointing_steps=2"])
    assert [args[2].shape[0] for args, _ in g_calls] == [4, 4] and not d_calls
    assert all(args[1] is None for args, _ in g_calls)
    assert not (out / "checkpoint-2" / "trainable_1.safetensors").exists()
    assert "CT" in (out / "README.md").read_text()


def test_lora_student(script, tiny_teacher_dir, prompts_file, tmp_path):
    out = tmp_path / "lora"
    script.main(CASE.argv(tiny_teacher_dir, prompts_file, out, "--student_lora_rank=4", "--max_train_steps=1"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    pipe = OneStepPipeline.from_teacher(tiny_teacher_dir, lora=str(out))
    assert torch.isfinite(pipe(PROMPTS[1], output_type="pt").images).all()


def test_presets_follow_the_official_imagenet_settings(script, tmp_path):
    common = [f"--output_dir={tmp_path / 'out'}", f"--train_data_dir={tmp_path}"]
    args, act = parse_args((TrainingArguments, script.ACTArguments), ["--preset=sd15-act", *common])
    assert (args.optimizer, args.learning_rate, args.adam_beta1, args.adam_beta2) == ("radam", 5e-5, 0.0, 0.99)
    assert (act.adversarial_weight, act.mid_weight, act.bins_max, act.ema_decay_init) == (0.6, 0.2, 200, 0.95)
    assert (act.r1_gamma, act.r1_interval) == (10.0, 16)


@pytest.mark.parametrize(
    "flags, match",
    [(["--ema_decay=0.99"], "--ema_decay"), (["--train_batch_size=6"], "--train_batch_size"),
     (["--adversarial_weight=0", "--r1_gamma=5"], "--adversarial_weight"), (["--bins_min=10", "--bins_max=5"],
     "--bins_max"), (["--discriminator_block_out_channels=a,b"], "--discriminator_block_out_channels"),
     (["--adversarial_weight=1.5"], "--adversarial_weight"), (["--mid_weight=0"], "--mid_weight"),
     (["--bins_min=1"], "--bins_min"), (["--ema_decay_init=1"], "--ema_decay_init"),
     (["--adversarial_weight=0.3", "--mid_weight=0.5"], "--mid_weight"),
     (["--discriminator_block_out_channels=12,24"], "--discriminator_block_out_channels"),
     (["--distance=l2"], "--distance")],
)  # fmt: skip
def test_bad_flags_are_refused_before_any_work(
    script, tiny_teacher_dir, prompts_file, tmp_path, flags, match, capsys, monkeypatch
):
    loaded = []
    monkeypatch.setattr(script.Distillation, "setup", lambda *a, **k: loaded.append(1))
    with pytest.raises((ValueError, SystemExit)) as error:
        script.main(CASE.argv(tiny_teacher_dir, prompts_file, tmp_path / "out", *flags))
    message = capsys.readouterr().err if error.type is SystemExit else str(error.value)
    assert match in message, message
    assert not loaded and not (tmp_path / "out").exists()


def test_lpips_distance_is_refused_with_an_install_hint_when_lpips_is_missing(
    script, tiny_teacher_dir, prompts_file, tmp_path, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real(name, *a))
    with pytest.raises(ValueError, match="`--distance lpips` needs `pip install lpips`"):
        script.main(CASE.argv(tiny_teacher_dir, prompts_file, tmp_path / "out", "--distance=lpips"))
    assert not (tmp_path / "out").exists()
