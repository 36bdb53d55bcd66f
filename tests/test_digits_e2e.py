"""The whole digits flow, reduced: prepare, judge, VAE, a short teacher, a short PG-SB distillation, evaluation.

Slow (a couple of minutes on 2 cores): `bash scripts/test.sh -m slow tests/test_digits_e2e.py`.
"""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples", "digits"))


def _script(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_digits_flow_end_to_end(tmp_path):
    import evaluate
    import judge
    import prepare_data
    import train_teacher
    import train_vae
    from digits_data import digit_prompts

    from diffusers_onestep import OneStepPipeline

    data, judge_dir, vae_dir = tmp_path / "data", tmp_path / "judge", tmp_path / "vae"
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"

    # 1. data as an image folder with captions, the judge on the train split, the VAE, a short teacher
    prepare_data.main(["--output_dir", str(data)])
    judge_results = judge.main(["--output_dir", str(judge_dir), "--epochs", "2"])
    assert judge_results["test_accuracy"] > 0.5
    train_vae.main(["--output_dir", str(vae_dir), "--max_train_steps", "20", "--channels", "16"])
    train_teacher.main([
        "--vae_dir", str(vae_dir), "--output_dir", str(teacher_dir), "--max_train_steps", "20",
        "--block_out_channels", "32", "64", "--train_batch_size", "32", "--log_every", "10",
    ])  # fmt: skip
    assert (teacher_dir / "model_index.json").exists()

    # 2. a short PG-SB distillation with the real script, reading the captions as prompts
    train = _script("train_pg_swiftbrush", os.path.join(ROOT, "training", "train_pg_swiftbrush.py"))
    train.main([
        "--pretrained_teacher_model_name_or_path", str(teacher_dir), "--output_dir", str(student_dir),
        "--train_prompts", str(data / "train" / "metadata.jsonl"), "--prompt_column", "text",
        "--t_init", "800", "--fake_score_lora_rank", "4", "--fake_score_lora_alpha", "4", "--learning_rate", "1e-5",
        "--train_batch_size", "8", "--max_train_steps", "3", "--checkpointing_steps", "2",
        "--validation_steps", "3", "--validation_prompts", "the number 7", "--report_to", "none", "--seed", "0",
    ])  # fmt: skip

    # 3. evaluation of the one-step student with the judge, as the benchmark does
    student = OneStepPipeline.from_pretrained(str(student_dir))
    student.set_progress_bar_config(disable=True)
    assert student.scheduler.config.t_init == 800
    evaluate.load_judge(str(judge_dir))
    metrics = evaluate.evaluate_pipeline(
        lambda prompts, generator: student(prompts, generator=generator, output_type="pt").images,
        digit_prompts(), n_per_prompt=3,
    )  # fmt: skip
    assert metrics["n"] == 30
    assert all(math.isfinite(metrics[k]) for k in ("fid", "accuracy", "precision", "recall"))
    assert 0 <= metrics["accuracy"] <= 1 and metrics["fid"] >= 0
    json.dumps({k: float(v) for k, v in metrics.items()})

    # 4. NASA reaches the student: the negative changes the images
    generic = student(["a handwritten digit"] * 4, generator=torch.Generator().manual_seed(0), output_type="pt")
    steered = student(["a handwritten digit"] * 4, negative_prompt="seven", nasa_scale=1.0,
                      generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
    assert (generic.images - steered.images).abs().max() > 1e-4


def test_demo_runs_on_the_shipped_checkpoints(tmp_path):
    """The README's main job, with tiny N: loads the shipped checkpoints and writes the table's figures and the picture."""
    demo = _script("digits_demo", os.path.join(ROOT, "examples", "digits", "demo.py"))
    results = demo.main(["--n_per_prompt", "2", "--teacher_steps", "2", "--output_dir", str(tmp_path)])
    assert (tmp_path / "digits_demo.png").is_file()
    label = demo.student_label(os.path.join(ROOT, "examples", "digits", "checkpoints", "student"))
    student = results[f"{label}, 1 step"]
    assert student["nfe"] == 1 and student["n"] == 20 and 0 <= student["accuracy"] <= 1
    assert results["teacher, 2 steps, CFG 1.25"]["nfe"] == 2 * 2  # the README table's CFG: two UNet passes a step
    assert 1 <= results["adaptive (k=50, refine)"]["nfe"] <= 1 + 2 * 4  # a refined image: 4 teacher steps under CFG
    assert all(0 <= row["removal_rate"] <= 1 for name, row in results.items() if name.startswith("nasa"))
