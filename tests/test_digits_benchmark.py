"""The digits benchmark (examples/digits/benchmark.py) and its oracle (oracle.py), end to end on tiny components.

Students are trained for two steps by training/train_pg_swiftbrush.py itself (a full student with EMA and a LoRA
student), so the checkpoint loading of table 4 reads exactly what the training script writes.
"""

import copy
import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from diffusers_onestep.training_utils import list_checkpoints


REPO = Path(__file__).resolve().parents[1]
DIGITS_DIR = REPO / "examples" / "digits"
sys.path.insert(0, str(DIGITS_DIR))

import benchmark  # noqa: E402
import oracle  # noqa: E402
from digits_data import load_digits_split  # noqa: E402
from judge import DigitsJudge, save_judge  # noqa: E402


PROMPTS = ["a handwritten digit seven", "the number 3", "a handwritten digit", "a photo of the digit one"]


@pytest.fixture(scope="module")
def students(tiny_teacher_dir, tmp_path_factory):
    """A full student (EMA) and a LoRA student, two training steps each, a checkpoint after every step."""
    spec = importlib.util.spec_from_file_location("train_pg_swiftbrush", REPO / "training" / "train_pg_swiftbrush.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    root = tmp_path_factory.mktemp("students")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = [f"--pretrained_teacher_model_name_or_path={tiny_teacher_dir}", f"--train_prompts={prompts}",
              "--train_batch_size=2", "--seed=0", "--fake_score_lora_rank=4", "--fake_score_lora_alpha=8",
              "--report_to=none", "--mixed_precision=no", "--max_train_steps=2", "--checkpointing_steps=1",
              "--t_init=800"]  # fmt: skip
    paths = {"full": str(root / "full"), "lora": str(root / "lora")}
    script.main([*common, f"--output_dir={paths['full']}", "--learning_rate=1e-3", "--use_ema", "--ema_decay=0.5"])
    script.main([*common, f"--output_dir={paths['lora']}", "--learning_rate=1e-2", "--student_lora_rank=2",
                 "--student_lora_alpha=2"])  # fmt: skip
    return paths


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """An untrained judge: the metrics only need its features and logits."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("judge"))
    save_judge(DigitsJudge(), path)
    return path


@pytest.fixture(scope="module")
def oracle_dir(tmp_path_factory):
    images, labels = load_digits_split("train")
    path = str(tmp_path_factory.mktemp("oracle"))
    save_judge(oracle.train_oracle_classifier(images[:300], labels[:300], epochs=1), path)
    return path


def test_prompt_digit():
    assert oracle.prompt_digit("a handwritten digit seven") == 7
    assert oracle.prompt_digit("the number 3") == 3
    assert oracle.prompt_digit("0") == 0
    assert oracle.prompt_digit("a photo of the digit one") == 1
    assert oracle.prompt_digit("a handwritten digit") is None


def test_oracle_scores_grayscale_and_rgb_alike(oracle_dir):
    classifier = oracle.load_or_train_oracle(oracle_dir)
    assert classifier.config["channels"] == list(oracle.ORACLE_CHANNELS)
    digits_oracle = oracle.DigitsOracle(classifier, batch_size=3)
    gray = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    scores = digits_oracle(gray, PROMPTS)
    assert scores.shape == (4,) and ((scores >= 0) & (scores <= 1)).all()
    torch.testing.assert_close(scores, digits_oracle(gray.expand(-1, 3, -1, -1), PROMPTS))
    # the prompted digit's probability, or the largest one for the generic prompt
    probabilities = classifier(gray * 2 - 1).softmax(dim=1)
    expected = torch.stack([probabilities[0, 7], probabilities[1, 3], probabilities[2].max(), probabilities[3, 1]])
    torch.testing.assert_close(scores, expected)


def test_checkpoints_hold_the_trained_students(students, tiny_teacher_dir):
    from diffusers import StableDiffusionPipeline

    teacher = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir)
    for kind in ("full", "lora"):
        student, description = benchmark.load_student(students[kind], teacher, tiny_teacher_dir)
        assert ("LoRA" in description) == (kind == "lora") and student.scheduler.config.t_init == 800
        assert student.vae is teacher.vae and student.text_encoder is teacher.text_encoder
        final = {n: p.detach().clone() for n, p in student.unet.named_parameters()}
        checkpoints = list_checkpoints(students[kind])
        assert [os.path.basename(c) for c in checkpoints] == ["checkpoint-1", "checkpoint-2"]
        loaded = []
        for checkpoint in checkpoints:
            unet = copy.deepcopy(student.unet)
            weights = benchmark.load_checkpoint_weights(unet, checkpoint)
            assert weights == ("ema" if kind == "full" else "raw")
            loaded.append(dict(unet.named_parameters()))
        # the last checkpoint is the saved student (EMA weights for the full one); the first one differs
        for name, value in final.items():
            torch.testing.assert_close(loaded[1][name], value)
        assert any(not torch.equal(loaded[0][n], v) for n, v in final.items())
    full, _ = benchmark.load_student(students["full"], teacher, tiny_teacher_dir)
    with pytest.raises(ValueError, match="does not hold this student"):
        benchmark.load_checkpoint_weights(full.unet, list_checkpoints(students["lora"])[0])


def _finite_numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _finite_numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _finite_numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_benchmark_end_to_end(students, tiny_teacher_dir, judge_dir, oracle_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "--teacher_dir", tiny_teacher_dir, "--judge_dir", judge_dir, "--output_dir", str(out),
        "--students", f"pgsb={students['full']}", f"lora={students['lora']}",
        "--n_per_prompt", "2", "--batch_size", "10", "--teacher_steps", "1", "2", "--student_steps", "1", "2",
        "--guidance_scales", "1", "2", "--guidance_select_steps", "2", "--nasa_scales", "0", "0.5",
        "--nasa_cfg_scales", "2", "--percentiles", "10", "90", "--adaptive_teacher_steps", "1",
        "--oracle_dir", oracle_dir,
    ]  # fmt: skip
    results = benchmark.main(argv)
    printed = capsys.readouterr().out
    assert printed.startswith("digits benchmark\ncommand: python examples/digits/benchmark.py --teacher_dir")
    for title in ("Table 1", "Table 2 (pgsb)", "Table 2 (lora)", "Table 3", "Table 4", "nasa_best_removal_rate: "):
        assert title in printed
    assert "pgsb_1step_fid: " in printed and "teacher_2step_fid: " in printed

    with open(out / "results.json") as f:
        saved = json.load(f)
    assert set(saved) >= {"config", "table1", "table2", "table3", "table4", "headline"}
    assert saved["headline"] == pytest.approx(results["headline"])
    numbers = [v for key in ("table1", "table2", "table3", "table4", "headline") for v in _finite_numbers(saved[key])]
    assert numbers and all(math.isfinite(v) for v in numbers)

    def check_metrics(row):
        assert row["fid"] >= 0 and row["nfe"] >= 1
        for name in ("accuracy", "precision", "recall"):
            assert 0 <= row[name] <= 1

    table1 = saved["table1"]
    assert [(r["model"], r["steps"]) for r in table1["rows"]] == [
        ("teacher", 1), ("teacher", 2), ("teacher", 2), ("pgsb", 1), ("pgsb", 2), ("lora", 1), ("lora", 2)
    ]  # fmt: skip
    assert {r["guidance_scale"] for r in table1["rows"] if r["steps"] == 2 and r["model"] == "teacher"} == {1.0, 2.0}
    for row in table1["rows"]:
        check_metrics(row)
        assert row["nfe"] == row["steps"] * (2 if (row["guidance_scale"] or 1) > 1 else 1)
    assert table1["floor"]["fid"] >= 0

    for name in ("pgsb", "lora"):
        rows = saved["table2"]["students"][name]["rows"]
        assert [(r["method"][:4], r["scale"], r["steps"], r["nfe"]) for r in rows][:2] == [
            ("NASA", 0.0, 1, 1), ("NASA", 0.5, 1, 1)
        ]  # fmt: skip
        assert rows[-1]["method"].startswith("CFG") and rows[-1]["nfe"] == 2
        for row in rows:
            assert 0 <= row["removal_rate"] <= 1 and row["fid_other9"] >= 0 and len(row["fid_per_digit"]) == 10

    table3 = saved["table3"]
    assert table3["student"] == "pgsb" and [r["k"] for r in table3["rows"]] == [10, 90]
    for row in table3["rows"]:
        check_metrics(row)
        assert 0 <= row["refined_share"] <= 1
        per_refined = 2 if saved["teacher_guidance_scale"] > 1 else 1
        assert row["nfe"] == pytest.approx(1 + row["refined_share"] * per_refined)
    assert len(table3["comparisons"]) == 4

    curves = saved["table4"]["curves"]
    assert [p["iteration"] for p in curves["pgsb"]] == [0, 1, 2] and [p["weights"] for p in curves["pgsb"]] == [
        "init", "ema", "ema"
    ]  # fmt: skip
    assert [p["weights"] for p in curves["lora"]] == ["init", "raw", "raw"]
    for points in curves.values():
        for point in points:
            check_metrics(point)

    grids = os.listdir(out / "grids")
    assert {"pgsb_1step.png", "teacher_dpm++2_cfg2.png", "pgsb_nasa0.5.png", "adaptive_pgsb_k10.png"} <= set(grids)
    if saved["table4"]["plot"] is not None:
        assert os.path.isfile(out / "distillation_curves.png")


def test_export_checkpoints_packs_one_training_checkpoint(students, tiny_teacher_dir, judge_dir, oracle_dir, tmp_path):
    import export_checkpoints
    from safetensors.torch import load_file

    from diffusers_onestep import OneStepPipeline

    out = tmp_path / "checkpoints"
    checkpoint = os.path.join(students["full"], "checkpoint-1")
    sizes = export_checkpoints.main(["--teacher_dir", tiny_teacher_dir, "--student_dir", students["full"],
                                     "--student_checkpoint", checkpoint, "--student_weights", "raw", "--judge_dir",
                                     judge_dir, "--oracle_dir", oracle_dir, "--output_dir", str(out),
                                     "--student_label", "PG-SB student"])  # fmt: skip
    assert set(sizes) == {"teacher", "student", "judge", "oracle"}
    assert export_checkpoints.student_label(str(out / "student")) == "PG-SB student"
    provenance = json.loads((out / "student" / export_checkpoints.PROVENANCE).read_text())
    assert (provenance["checkpoint"], provenance["weights"]) == (checkpoint, "raw")
    assert "train_pg_swiftbrush.py" in (out / "student" / "README.md").read_text()  # the run's model card
    unet = OneStepPipeline.from_pretrained(out / "student").unet
    raw = load_file(os.path.join(checkpoint, "trainable_0.safetensors"))
    for name, param in unet.named_parameters():  # the checkpoint's raw weights, stored in float16
        torch.testing.assert_close(param.float(), raw[name].half().float())
    final = OneStepPipeline.from_pretrained(students["full"]).unet  # the EMA of the final save differs
    assert any(not torch.equal(p.half(), q.half()) for p, q in zip(unet.parameters(), final.parameters()))
    with pytest.raises(SystemExit):
        export_checkpoints.main(["--teacher_dir", tiny_teacher_dir, "--student_dir", students["full"],
                                 "--student_checkpoint", str(tmp_path), "--judge_dir", judge_dir,
                                 "--oracle_dir", oracle_dir, "--output_dir", str(out)])  # fmt: skip
    assert (out / "student").is_dir()  # refused before the old export was removed
    # re-exporting in place: the judge and the oracle are read from the directory being rewritten
    export_checkpoints.main(["--teacher_dir", str(out / "teacher"), "--student_dir", students["full"], "--judge_dir",
                             str(out / "judge"), "--oracle_dir", str(out / "oracle"), "--output_dir", str(out)])  # fmt: skip
    assert sorted(os.listdir(out)) == ["judge", "oracle", "student", "teacher"]
    assert json.loads((out / "student" / export_checkpoints.PROVENANCE).read_text())["weights"] == "final save"
