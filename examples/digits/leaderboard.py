"""The digits leaderboard: every distillation method from one teacher, at one CPU budget, swept and scored.

    OMP_NUM_THREADS=1 python examples/digits/leaderboard.py --data_dir /work/digits_artifacts/data \
        --output_dir /work/digits_artifacts/leaderboard --budget_minutes 6 --jobs 2

For every method of `METHODS` (the real training scripts with the digits commands of README.md) and every sweep
variant of `VARIANTS` (the method's learning rate, twice it, and half its batch; each run keeps the EMA and both the
raw and the EMA weights are scored, so "EMA or not" is swept for free), the command

1. **calibrates** the CPU seconds per iteration of each (method, batch) with a short run (`--max_train_minutes`);
2. **trains** with `--max_train_minutes B --train_clock cpu`: B minutes of the training process's CPU time (core
   minutes, one OpenMP thread per run, `--jobs` runs side by side), `--max_train_steps` set from the calibration so
   that step-dependent schedules (ECT's stages, ACT's N(k)) span the budget, about `--checkpoints` checkpoints along
   the way, each with its CPU minutes in its `checkpoint.json`;
3. **scores** every checkpoint (and the teacher weights at iteration 0) on the same prompts, N and seed (1 step; 2
   steps as well for the consistency methods), EMA and raw weights;
4. **re-scores** each method's best checkpoint (by 1-step FID) and the shipped student on a fresh seed at
   `--final_n_per_prompt`, with the teacher, precision / recall and images per second, so that the selection does not
   bias the reported figure; writes `leaderboard.json`, `leaderboard.md` (the tables of README.md) and
   `budget.png` (best FID so far against CPU minutes, every method).

On a GPU, `--train_clock wall --jobs 1` makes the budget GPU wall minutes. Every stage is resumable: finished runs (`run.json`) and scores (`scores.json`) are kept and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@dataclasses.dataclass(frozen=True)
class Method:
    script: str  # under training/
    data: str  # "prompts" (data-free distillation) or "images" (consistency tuning / training on the real digits)
    learning_rate: float
    batch_size: int
    ema_decay: float | None  # None: the method's own EMA (ACT's mu(k), which is its consistency target)
    flags: tuple[str, ...] = ()
    steps: tuple[int, ...] = (1,)  # student steps scored
    stages: bool = False  # ECT / SCT: two stages over the budget (--double_every = iterations / 2)
    scale_fake_lr: bool = False  # SiD: the fake score's learning rate follows the generator's (official: equal)


_PGSB = ("--t_init", "800", "--fake_score_lora_rank", "16", "--fake_score_lora_alpha", "16",
         "--fake_score_learning_rate", "1e-3")  # fmt: skip
_SID = ("--t_init", "625", "--input_type", "scaled_noise", "--alpha", "1.0", "--adam_beta1", "0", "--adam_beta2",
        "0.999", "--adam_weight_decay", "0")  # fmt: skip
_CONSISTENCY = ("--optimizer", "radam", "--adam_weight_decay", "0")
METHODS = {
    "pgsb": Method("train_pg_swiftbrush.py", "prompts", 1e-5, 16, 0.99, _PGSB),
    "swiftbrush": Method("train_pg_swiftbrush.py", "prompts", 1e-5, 16, 0.99, (*_PGSB, "--fixed_guidance_scale", "2.25")),
    "sid": Method("train_sid.py", "prompts", 1e-5, 16, 0.99, (*_SID, "--guidance_scale", "1.0"), scale_fake_lr=True),
    "sid_lsg": Method("train_sid.py", "prompts", 1e-5, 16, 0.99, (*_SID, "--guidance_scale", "1.5"), scale_fake_lr=True),
    "ect": Method("train_sct.py", "images", 1e-4, 32, 0.999, (*_CONSISTENCY, "--method", "ect", "--dropout", "0"),
                  steps=(1, 2), stages=True),  # fmt: skip
    "sct": Method("train_sct.py", "images", 1e-4, 32, 0.999, (*_CONSISTENCY, "--method", "sct", "--dropout", "0"),
                  steps=(1, 2), stages=True),  # fmt: skip
    "act": Method("train_act.py", "images", 1e-4, 32, None, (*_CONSISTENCY, "--adam_beta1", "0", "--adam_beta2", "0.99"),
                  steps=(1, 2)),  # fmt: skip
    "ct": Method("train_act.py", "images", 1e-4, 32, None,
                 (*_CONSISTENCY, "--adam_beta1", "0", "--adam_beta2", "0.99", "--adversarial_weight", "0"), steps=(1, 2)),
}  # fmt: skip
# name -> (learning-rate factor, batch factor)
VARIANTS = {"base": (1.0, 1.0), "lr2x": (2.0, 1.0), "batch_half": (1.0, 0.5)}


def run_settings(method: Method, variant: str) -> tuple[float, int]:
    lr_factor, batch_factor = VARIANTS[variant]
    return method.learning_rate * lr_factor, max(1, int(method.batch_size * batch_factor))


def training_command(name: str, variant: str, args, output_dir: str, minutes: float, max_steps: int,
                     checkpointing_steps: int) -> list[str]:  # fmt: skip
    r"""The training script's command line for one run (the README's digits command, with the budget flags)."""
    method = METHODS[name]
    lr, batch = run_settings(method, variant)
    train = os.path.join(args.data_dir, "train")
    data = (["--train_prompts", os.path.join(train, "metadata.jsonl"), "--prompt_column", "text"]
            if method.data == "prompts" else ["--train_data_dir", train])  # fmt: skip
    command = [
        sys.executable, os.path.join(ROOT, "training", method.script), "--pretrained_teacher_model_name_or_path",
        args.teacher_dir, *data, "--output_dir", output_dir, *method.flags, "--learning_rate", f"{lr:g}",
        "--train_batch_size", str(batch), "--use_ema",
        "--max_train_steps", str(max_steps), "--checkpointing_steps", str(checkpointing_steps),
        "--max_train_minutes", f"{minutes:g}", "--train_clock", getattr(args, "train_clock", "cpu"), "--report_to",
        "none", "--seed", str(args.seed),
    ]  # fmt: skip
    if method.ema_decay is not None:
        command += ["--ema_decay", f"{method.ema_decay:g}"]
    if method.scale_fake_lr:
        command += ["--fake_score_learning_rate", f"{lr:g}"]
    if method.stages:
        command += ["--double_every", str(max(1, max_steps // 2))]
    return command


def read_manifests(run_dir: str) -> list[dict]:
    from diffusers_onestep.training_utils import list_checkpoints
    from diffusers_onestep.training_utils.loop import CHECKPOINT_MANIFEST

    out = []
    for path in list_checkpoints(run_dir):
        with open(os.path.join(path, CHECKPOINT_MANIFEST)) as file:
            manifest = json.load(file)
        out.append({"path": path, "step": manifest["step"], "minutes": manifest.get("train_minutes")})
    return out


def seconds_per_iteration(manifests: list[dict]) -> float:
    r"""Seconds per iteration from checkpoints' (step, minutes): the slope between the first and the last one, so
    that the set-up and the first iterations' warm-up do not count (the average of the only one otherwise)."""
    if not manifests:
        raise ValueError("no checkpoint to calibrate from")
    first, last = manifests[0], manifests[-1]
    if last["step"] > first["step"]:
        return (last["minutes"] - first["minutes"]) * 60 / (last["step"] - first["step"])
    return last["minutes"] * 60 / last["step"]


class Jobs:
    r"""At most `n` subprocesses at once, each with one OpenMP thread, logged to a file; `then` runs on success."""

    def __init__(self, n: int):
        self.n, self.running, self.failed = n, [], []

    def wait_for_slot(self, slots: int = 1) -> None:
        while len(self.running) > self.n - slots:
            time.sleep(2)
            for job in list(self.running):
                process, log, label, then = job
                if process.poll() is None:
                    continue
                self.running.remove(job)
                log.close()
                if process.returncode == 0:
                    print(f"done: {label}", flush=True)
                    then()
                else:
                    print(f"FAILED ({process.returncode}): {label}, see {log.name}", flush=True)
                    self.failed.append(label)

    def start(self, command: list[str], log_path: str, label: str, then=lambda: None) -> None:
        self.wait_for_slot()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        log = open(log_path, "w")
        print(f"start: {label}", flush=True)
        self.running.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log, label, then))

    def join(self) -> None:
        self.wait_for_slot(self.n)


def calibrate(args, jobs: Jobs) -> dict[str, float]:
    r"""CPU seconds per iteration of every (method, batch), from a short run stopped by `--calibration_minutes`."""
    path = os.path.join(args.output_dir, "calibration.json")
    seconds = json.load(open(path)) if os.path.isfile(path) else {}
    pending = {}
    for name in args.methods:
        for variant in args.variants:
            key = f"{name}@{run_settings(METHODS[name], variant)[1]}"
            run_dir = os.path.join(args.output_dir, "calibration", key)
            if key in seconds or key in pending:
                continue
            pending[key] = run_dir
            command = training_command(name, variant, args, run_dir, args.calibration_minutes, 100_000, 8)
            jobs.start(command, run_dir + ".log", f"calibration {key}")
    jobs.join()
    if jobs.failed:
        raise SystemExit(f"failed: {', '.join(jobs.failed)}")
    for key, run_dir in pending.items():
        manifests = read_manifests(run_dir)
        seconds[key] = seconds_per_iteration(manifests)
        print(f"calibration {key}: {seconds[key]:.3f} CPU s / iteration ({manifests[-1]['step']} iterations)",
              flush=True)  # fmt: skip
    with open(path, "w") as file:
        json.dump(seconds, file, indent=1)
    return seconds


def score_command(args, run_dir: str, steps: tuple[int, ...]) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--score_run", run_dir, "--teacher_dir", args.teacher_dir,
            "--judge_dir", args.judge_dir, "--n_per_prompt", str(args.n_per_prompt), "--seed", str(args.seed),
            "--score_steps", *map(str, steps)]  # fmt: skip


def student_sampler(pipe, call_kwargs: dict, steps: int):
    r"""A `pipe_callable` for `evaluate_pipeline`: the student pipeline at `steps` steps."""

    def sample(prompts, generator):
        return pipe(prompts, generator=generator, output_type="pt", num_inference_steps=steps, **call_kwargs).images

    return sample


def score_run(args) -> dict:
    r"""Scores every checkpoint of `args.score_run` (EMA and raw weights, each of `--score_steps`) into scores.json."""
    from benchmark import load_checkpoint_weights
    from curves import student_pipeline
    from diffusers import DiffusionPipeline
    from digits_data import digit_prompts
    from evaluate import evaluate_pipeline, load_judge

    judge = load_judge(args.judge_dir)
    teacher = DiffusionPipeline.from_pretrained(args.teacher_dir, use_safetensors=True)
    pipe, network, call_kwargs = student_pipeline(args.teacher_dir, teacher, args.score_run, 800)
    points = []
    checkpoints = [{"path": None, "step": 0, "minutes": 0.0}, *read_manifests(args.score_run)]
    for checkpoint in checkpoints:
        for weights in ("ema", "raw") if checkpoint["path"] else ("init",):
            if checkpoint["path"]:
                loaded = load_checkpoint_weights(network, checkpoint["path"], prefer_ema=weights == "ema")
                if loaded != weights:
                    continue  # a run without EMA
            for steps in args.score_steps:
                sample = student_sampler(pipe, call_kwargs, steps)
                metrics = evaluate_pipeline(sample, digit_prompts(), args.n_per_prompt, judge=judge, seed=args.seed)
                metrics.pop("seconds", None)
                points.append({"step": checkpoint["step"], "minutes": checkpoint["minutes"], "weights": weights,
                               "steps": steps, **metrics})  # fmt: skip
    with open(os.path.join(args.score_run, "scores.json"), "w") as file:
        json.dump(points, file, indent=1, default=float)
    return points


def train_all(args, seconds: dict[str, float], jobs: Jobs) -> dict[str, dict]:
    runs = {}
    for name in args.methods:
        for variant in args.variants:
            method, label = METHODS[name], f"{name}/{variant}"
            lr, batch = run_settings(method, variant)
            run_dir = os.path.join(args.output_dir, "runs", name, variant)
            per_iteration = seconds[f"{name}@{batch}"]
            max_steps = max(2, int(args.budget_minutes * 60 / per_iteration))
            every = max(1, round(max_steps / args.checkpoints))
            info = {"method": name, "variant": variant, "learning_rate": lr, "batch_size": batch,
                    "ema_decay": method.ema_decay, "cpu_seconds_per_iteration": per_iteration,
                    "max_train_steps": max_steps, "run_dir": run_dir}  # fmt: skip
            runs[label] = info
            scored = os.path.join(run_dir, "scores.json")
            if os.path.isfile(scored):
                continue

            def score(run_dir=run_dir, steps=method.steps, label=label):
                jobs.start(score_command(args, run_dir, steps), run_dir + ".score.log", f"scoring {label}")

            if os.path.isfile(os.path.join(run_dir, "model_index.json")):
                score()
                continue
            command = training_command(name, variant, args, run_dir, args.budget_minutes, max_steps, every)
            info["command"] = command
            jobs.start(command, run_dir + ".log", f"training {label} ({max_steps} iterations max)", then=score)
    jobs.join()
    for info in runs.values():
        with open(os.path.join(info["run_dir"], "scores.json")) as file:
            info["points"] = json.load(file)
    return runs


def best_point(runs: dict, name: str, steps: int = 1) -> tuple[dict, dict] | None:
    r"""The (run, point) with the lowest FID at `steps` over every variant, checkpoint and weights of `name`."""
    candidates = [(info, p) for info in runs.values() if info["method"] == name for p in info["points"]
                  if p["steps"] == steps and p["step"] > 0]  # fmt: skip
    return min(candidates, key=lambda c: c[1]["fid"]) if candidates else None


def rescore(args, runs: dict) -> dict:
    r"""Each method's best checkpoint, the shipped student and the teacher, on a fresh seed at the final N."""
    from benchmark import load_checkpoint_weights
    from curves import student_pipeline
    from diffusers import DiffusionPipeline
    from digits_data import digit_prompts
    from evaluate import evaluate_pipeline, load_judge, teacher_sampler

    from diffusers_onestep import OneStepPipeline

    judge = load_judge(args.judge_dir)
    teacher = DiffusionPipeline.from_pretrained(args.teacher_dir, use_safetensors=True)
    teacher.set_progress_bar_config(disable=True)
    seed, n = args.seed + 1, args.final_n_per_prompt

    def evaluate(sample):
        return evaluate_pipeline(sample, digit_prompts(), n, judge=judge, seed=seed)

    rows = {}
    for label, guidance in (("teacher, DPM-Solver++ 25, CFG 1.25", 1.25), ("teacher, DPM-Solver++ 25, no CFG", 1.0)):
        sample, nfe = teacher_sampler(teacher, "dpm++:25", guidance)
        rows[label] = {**evaluate(sample), "nfe": nfe}
        print(f"{label}: FID {rows[label]['fid']:.3f}", flush=True)
    if os.path.isdir(args.shipped_student):
        shipped = OneStepPipeline.from_pretrained(args.shipped_student, dtype=torch.float32)
        shipped.set_progress_bar_config(disable=True)
        rows["shipped student"] = {
            **evaluate(lambda p, g: shipped(p, generator=g, output_type="pt").images), "nfe": 1}  # fmt: skip
    for name in args.methods:
        for steps in METHODS[name].steps:
            best = best_point(runs, name, steps)
            if best is None:
                continue
            info, point = best
            pipe, network, call_kwargs = student_pipeline(args.teacher_dir, teacher, info["run_dir"], 800)
            checkpoint = os.path.join(info["run_dir"], f"checkpoint-{point['step']}")
            load_checkpoint_weights(network, checkpoint, prefer_ema=point["weights"] == "ema")
            metrics = evaluate(student_sampler(pipe, call_kwargs, steps))
            label = f"{name}, {steps} step" + ("s" if steps > 1 else "")
            rows[label] = {**metrics, "nfe": steps, "method": name, "variant": info["variant"], "step": point["step"],
                           "minutes": point["minutes"], "weights": point["weights"], "selection_fid": point["fid"],
                           "checkpoint": checkpoint}  # fmt: skip
            print(f"{label}: FID {metrics['fid']:.3f} ({info['variant']}, {point['weights']} weights, iteration "
                  f"{point['step']})", flush=True)  # fmt: skip
    reference = rows["teacher, DPM-Solver++ 25, CFG 1.25"]["images_per_second"]
    for row in rows.values():
        row["speed"] = row["images_per_second"] / reference
    return rows


def _clock(args) -> str:
    return "CPU" if getattr(args, "train_clock", "cpu") == "cpu" else "wall"


def tables(args, runs: dict, rows: dict) -> str:
    teacher = rows["teacher, DPM-Solver++ 25, CFG 1.25"]["fid"]
    lines = [f"Leaderboard (N = {10 * args.final_n_per_prompt}, seed {args.seed + 1}; each method's best checkpoint by "
             f"1-step FID at N = {10 * args.n_per_prompt}, seed {args.seed}; budget {args.budget_minutes:g} {_clock(args)} "
             "minutes per run):", "",
             f"| model | run (variant, weights, iteration, {_clock(args)} min) | NFE | digits-FID | vs teacher | FID@297 | accuracy "
             "| precision | recall | speed |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for label, r in sorted(rows.items(), key=lambda item: item[1]["fid"]):
        run = (f"{r['variant']}, {r['weights']}, {r['step']}, {r['minutes']:.1f}" if "variant" in r else "")
        lines.append(f"| {label} | {run} | {r['nfe']} | {r['fid']:.2f} | {r['fid'] / teacher:.1f}x | "
                     f"{r.get('fid_matched', float('nan')):.2f} | {100 * r['accuracy']:.1f}% | {r['precision']:.3f} | {r['recall']:.3f} "
                     f"| {r['speed']:.0f}x |")  # fmt: skip
    lines += ["", f"Every run (1-step digits-FID at N = {10 * args.n_per_prompt}; best checkpoint and the last one):", "",
              f"| method | variant | lr | batch | {_clock(args)} s/it | iterations | minutes | best EMA (min) | best raw (min) "
              "| last EMA | last raw | best 2-step |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for info in runs.values():
        def pick(weights, steps=1, best=True):
            points = [p for p in info["points"] if p["weights"] == weights and p["steps"] == steps and p["step"] > 0]
            if not points:
                return "-"
            p = min(points, key=lambda p: p["fid"]) if best else max(points, key=lambda p: p["step"])
            return f"{p['fid']:.2f}" + (f" ({p['minutes']:.1f})" if best else "")

        last = max(p["step"] for p in info["points"])
        used = max(p["minutes"] for p in info["points"])  # at the last checkpoint: the budget spent
        two = min((p["fid"] for p in info["points"] if p["steps"] == 2 and p["step"] > 0), default=None)
        lines.append(f"| {info['method']} | {info['variant']} | {info['learning_rate']:g} | {info['batch_size']} | "
                     f"{info['cpu_seconds_per_iteration']:.2f} | {last} | {used:.1f} | {pick('ema')} | {pick('raw')} | "
                     f"{pick('ema', best=False)} | {pick('raw', best=False)} | {'-' if two is None else f'{two:.2f}'} |")  # fmt: skip
    return "\n".join(lines)


def plot_budget(args, runs: dict, reference: float, path: str) -> str | None:
    r"""Best 1-step FID so far against CPU minutes, over every variant and weights of each method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for name in args.methods:
        points = sorted((p["minutes"], p["fid"]) for info in runs.values() if info["method"] == name
                        for p in info["points"] if p["steps"] == 1 and p["step"] > 0)  # fmt: skip
        xs, ys, best = [], [], float("inf")
        for minutes, fid in points:
            best = min(best, fid)
            xs.append(minutes)
            ys.append(best)
        axis.step(xs, ys, where="post", marker=".", label=name)
    n = 10 * getattr(args, "final_n_per_prompt", args.n_per_prompt)  # the teacher is scored with the re-scored rows
    axis.axhline(reference, color="grey", linestyle="--", label=f"teacher, 25 steps, CFG 1.25 (N = {n})")
    axis.axhline(1.2 * reference, color="grey", linestyle=":", label="target: 1.2x the teacher")
    axis.set(xlabel=f"{_clock(args)} minutes of training" + (" (one core)" if _clock(args) == "CPU" else ""), ylabel=f"best 1-step digits-FID so far (N = {10 * args.n_per_prompt})",
             yscale="log", title="digits: best FID against budget, every method")  # fmt: skip
    axis.legend(fontsize=8, ncol=2)
    figure.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="/work/digits_artifacts/data", help="prepare_data.py's output")
    parser.add_argument("--teacher_dir", default=os.path.join(HERE, "checkpoints", "teacher"))
    parser.add_argument("--judge_dir", default=os.path.join(HERE, "checkpoints", "judge"))
    parser.add_argument("--shipped_student", default=os.path.join(HERE, "checkpoints", "student"))
    parser.add_argument("--output_dir", required=False)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--budget_minutes", type=float, default=6.0, help="minutes of training per run (--train_clock)")
    parser.add_argument("--train_clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: the process's CPU time (core-minutes, for CPU runs); wall: for a GPU (--jobs 1)")  # fmt: skip
    parser.add_argument("--calibration_minutes", type=float, default=0.4)
    parser.add_argument("--checkpoints", type=int, default=6, help="about this many checkpoints per run")
    parser.add_argument("--jobs", type=int, default=2, help="processes side by side (one thread each)")
    parser.add_argument("--n_per_prompt", type=int, default=20, help="images per digit prompt for every checkpoint")
    parser.add_argument("--final_n_per_prompt", type=int, default=50, help="for the re-scored leaderboard rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from_json", default=None, help="re-write the tables and plot of a leaderboard.json")
    parser.add_argument("--score_run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--score_steps", type=int, nargs="+", default=[1], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for flag in ("budget_minutes", "calibration_minutes"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be > 0, got {getattr(args, flag)}")
    for flag in ("checkpoints", "jobs", "n_per_prompt", "final_n_per_prompt"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.score_run:
        with torch.no_grad():
            return {"points": score_run(args)}
    if not args.output_dir:
        parser.error("--output_dir is required")
    if args.from_json:  # the tables and the plot again, from a finished run's leaderboard.json
        with open(args.from_json) as file:
            result = json.load(file)
        args = argparse.Namespace(**{**result["args"], "output_dir": args.output_dir, "from_json": args.from_json})
        return _report(args, result["calibration"], result["runs"], result["leaderboard"])
    if not os.path.isfile(os.path.join(args.data_dir, "train", "metadata.jsonl")):
        parser.error(f"--data_dir {args.data_dir} has no train/metadata.jsonl: run examples/digits/prepare_data.py")
    os.makedirs(args.output_dir, exist_ok=True)

    jobs = Jobs(args.jobs)
    seconds = calibrate(args, jobs)
    runs = train_all(args, seconds, jobs)
    if jobs.failed:
        raise SystemExit(f"failed: {', '.join(jobs.failed)}")
    with torch.no_grad():
        rows = rescore(args, runs)
    return _report(args, seconds, runs, rows)


def _report(args, seconds: dict, runs: dict, rows: dict) -> dict:
    text = tables(args, runs, rows)
    print(text)
    plot = plot_budget(args, runs, rows["teacher, DPM-Solver++ 25, CFG 1.25"]["fid"],
                       os.path.join(args.output_dir, "budget.png"))  # fmt: skip
    with open(os.path.join(args.output_dir, "leaderboard.md"), "w") as file:
        file.write(text + "\n")
    result = {"args": vars(args), "calibration": seconds, "runs": runs, "leaderboard": rows}
    with open(os.path.join(args.output_dir, "leaderboard.json"), "w") as file:
        json.dump(result, file, indent=1, default=float)
    print(f"plot: {plot}")
    return result


if __name__ == "__main__":
    main()
