"""examples/digits/leaderboard.py: every run's command is one its training script accepts, the calibration, the job
pool, the selection and the tables. The whole command on the shipped digits teacher: slow."""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from training_scripts import SCRIPTS, load_script

from diffusers_onestep.training_utils import TrainingArguments, parse_args, validate_training_args


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "digits"))

import leaderboard  # noqa: E402


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "metadata.jsonl").write_text('{"file_name": "0.png", "text": "0"}\n')
    return str(tmp_path / "data")


@pytest.mark.parametrize("name", list(leaderboard.METHODS))
def test_every_run_command_is_accepted_by_its_script(name, data_dir, tmp_path):
    method = leaderboard.METHODS[name]
    module = load_script(next(c for c in SCRIPTS if c.name == method.script.removesuffix(".py")))
    extra = next(v for k, v in vars(module).items() if k.endswith("Arguments") and k != "TrainingArguments"
                 and isinstance(v, type))  # fmt: skip
    options = SimpleNamespace(data_dir=data_dir, teacher_dir="org/teacher", seed=0)
    for variant, (lr_factor, batch_factor) in leaderboard.VARIANTS.items():
        command = leaderboard.training_command(name, variant, options, str(tmp_path / "out"), 6.0, 300, 50)
        assert command[1].endswith(os.path.join("training", method.script))
        args, own = parse_args((TrainingArguments, extra), command[2:])
        validate_training_args(args)
        assert args.learning_rate == pytest.approx(method.learning_rate * lr_factor)
        assert args.train_batch_size == int(method.batch_size * batch_factor)
        assert (args.max_train_minutes, args.train_clock, args.max_train_steps, args.checkpointing_steps) == (
            6.0, "cpu", 300, 50)  # fmt: skip
        assert args.use_ema and ("--ema_decay" in command) == (method.ema_decay is not None)
        if method.ema_decay is not None:
            assert args.ema_decay == method.ema_decay
        if method.stages:
            assert own.double_every == 150  # two stages over the budget
        if method.scale_fake_lr:
            assert own.fake_score_learning_rate == pytest.approx(args.learning_rate)
        assert (args.train_prompts is not None) == (method.data == "prompts")
    if name in ("sid", "sid_lsg"):
        assert own.guidance_scale == (1.0 if name == "sid" else 1.5)
    if name == "swiftbrush":
        assert own.fixed_guidance_scale == 2.25
    if name == "ct":
        assert own.adversarial_weight == 0


def test_seconds_per_iteration_is_the_slope_between_checkpoints():
    manifests = [{"step": 8, "minutes": 0.5}, {"step": 16, "minutes": 0.6}, {"step": 24, "minutes": 0.7}]
    assert leaderboard.seconds_per_iteration(manifests) == pytest.approx(0.2 * 60 / 16)  # warm-up excluded
    assert leaderboard.seconds_per_iteration(manifests[:1]) == pytest.approx(0.5 * 60 / 8)
    with pytest.raises(ValueError, match="no checkpoint"):
        leaderboard.seconds_per_iteration([])


def test_jobs_run_side_by_side_report_failures_and_chain(tmp_path):
    jobs, chained = leaderboard.Jobs(2), []
    ok = [sys.executable, "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"]
    jobs.start(ok, str(tmp_path / "logs" / "ok.log"), "ok",
               then=lambda: jobs.start(ok, str(tmp_path / "logs" / "next.log"), "next", then=lambda: chained.append(1)))
    jobs.start([sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path / "logs" / "bad.log"), "bad",
               then=lambda: chained.append("never"))  # fmt: skip
    assert len(jobs.running) == 2
    jobs.join()
    assert jobs.failed == ["bad"] and chained == [1] and not jobs.running
    assert (tmp_path / "logs" / "next.log").read_text().strip() == "1"  # one OpenMP thread per job


def _points(fids_1, fids_2=()):
    points = [{"step": 0, "minutes": 0.0, "weights": "init", "steps": 1, "fid": 1.0}]  # iteration 0 never wins
    for i, fid in enumerate(fids_1):
        for weights, offset in (("ema", 0.0), ("raw", 0.5)):
            points.append({"step": 10 * (i + 1), "minutes": i + 1.0, "weights": weights, "steps": 1, "fid": fid + offset})
    points += [{"step": 10 * (i + 1), "minutes": i + 1.0, "weights": "ema", "steps": 2, "fid": f} for i, f in
               enumerate(fids_2)]  # fmt: skip
    return points


def test_best_point_tables_and_budget_plot(tmp_path):
    runs = {
        "ect/base": {"method": "ect", "variant": "base", "learning_rate": 1e-4, "batch_size": 32,
                     "cpu_seconds_per_iteration": 0.6, "run_dir": "r1", "points": _points([9.0, 7.0, 8.0], [5.0, 4.0])},
        "ect/lr2x": {"method": "ect", "variant": "lr2x", "learning_rate": 2e-4, "batch_size": 32,
                     "cpu_seconds_per_iteration": 0.6, "run_dir": "r2", "points": _points([6.5, 9.0])},
        "pgsb/base": {"method": "pgsb", "variant": "base", "learning_rate": 1e-5, "batch_size": 16,
                      "cpu_seconds_per_iteration": 1.3, "run_dir": "r3", "points": _points([20.0])},
    }  # fmt: skip
    info, point = leaderboard.best_point(runs, "ect")
    assert (info["variant"], point["step"], point["weights"], point["fid"]) == ("lr2x", 10, "ema", 6.5)
    assert leaderboard.best_point(runs, "ect", steps=2)[1]["fid"] == 4.0
    assert leaderboard.best_point(runs, "act") is None
    metrics = {"fid_matched": 1.0, "accuracy": 0.9, "precision": 0.8, "recall": 0.7, "speed": 1.0}
    rows = {"teacher, DPM-Solver++ 25, CFG 1.25": {**metrics, "fid": 2.0, "nfe": 50},
            "ect, 1 step": {**metrics, "fid": 6.0, "nfe": 1, "variant": "lr2x", "weights": "ema", "step": 10,
                            "minutes": 1.0}}  # fmt: skip
    options = SimpleNamespace(final_n_per_prompt=100, n_per_prompt=50, seed=0, budget_minutes=6.0,
                              methods=["ect", "pgsb"])  # fmt: skip
    text = leaderboard.tables(options, runs, rows)
    assert "| ect, 1 step | lr2x, ema, 10, 1.0 | 1 | 6.00 | 3.0x |" in text
    # every run is reported: best EMA / raw with their CPU minutes, the last checkpoint's, the best 2-step
    assert "| ect | base | 0.0001 | 32 | 0.60 | 30 | 3.0 | 7.00 (2.0) | 7.50 (2.0) | 8.00 | 8.50 | 4.00 |" in text
    assert "| pgsb | base | 1e-05 | 16 | 1.30 | 10 | 1.0 | 20.00 (1.0) | 20.50 (1.0) | 20.00 | 20.50 | - |" in text
    pytest.importorskip("matplotlib")
    path = leaderboard.plot_budget(options, runs, 2.0, str(tmp_path / "budget.png"))
    assert os.path.getsize(path) > 0


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    for argv, match in [(["--budget_minutes", "0"], "--budget_minutes"), (["--jobs", "0"], "--jobs"),
                        (["--methods", "dmd"], "--methods"), (["--data_dir", str(tmp_path)], "prepare_data.py")]:  # fmt: skip
        with pytest.raises(SystemExit):
            leaderboard.main(["--output_dir", str(tmp_path / "out"), *argv])
        assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_whole_command_on_the_shipped_teacher(tmp_path):
    import prepare_data

    prepare_data.main(["--output_dir", str(tmp_path / "data")])
    out = tmp_path / "board"
    result = leaderboard.main(["--data_dir", str(tmp_path / "data"), "--output_dir", str(out), "--methods", "ect",
                               "--variants", "base", "--budget_minutes", "0.1", "--calibration_minutes", "0.1",
                               "--n_per_prompt", "2", "--final_n_per_prompt", "2", "--checkpoints", "2"])  # fmt: skip
    run = result["runs"]["ect/base"]
    minutes = [p["minutes"] for p in run["points"] if p["step"] > 0]
    assert minutes and max(minutes) <= 0.1 + 0.05  # the budget held (one iteration's overshoot at most)
    assert {p["weights"] for p in run["points"]} == {"init", "ema", "raw"} and {p["steps"] for p in run["points"]} == {1, 2}
    assert {"ect, 1 step", "ect, 2 steps", "shipped student"} <= set(result["leaderboard"])
    assert json.loads((out / "leaderboard.json").read_text())["calibration"]["ect@32"] > 0
    assert "| ect | base |" in (out / "leaderboard.md").read_text()
    (out / "leaderboard.md").unlink()
    again = leaderboard.main(["--output_dir", str(out), "--from_json", str(out / "leaderboard.json")])
    assert again["leaderboard"].keys() == result["leaderboard"].keys() and (out / "leaderboard.md").is_file()
