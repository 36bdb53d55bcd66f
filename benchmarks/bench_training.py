"""Training cost of PG-SwiftBrush and SiD: step overhead and memory of the shared-base LoRA modes.

1. Iteration time of the real script (`training/train_pg_swiftbrush.py`, timed between the loop's steps) divided by
   the sum of the passes one iteration needs, each timed alone on the same UNet: student forward+backward, teacher
   forward with CFG (2B), fake score forward with CFG (2B), fake score forward+backward. Physical limit: about 1.00
   (the rest is optimizer steps, clipping, prompt encoding, adapter switching).
2. Peak memory of a run with a LoRA student (teacher, fake score and student on one frozen UNet) and with a full
   student (trainable copy + Adam states next to the teacher), each in a fresh process: CUDA peak allocated memory,
   or on CPU the peak resident set (VmHWM) above the process's size before the run.
3. SiD (`training/train_sid.py`, `--methods sid`): its iteration over its passes timed alone (student forward without
   gradient; the fake score's CFG forward+backward; the generator chain: student forward, teacher and fake-score CFG
   forwards, one backward through all three, as SiD's loss has no stop-gradient), for a full and a LoRA fake score,
   and the peak memory of a full fake-score copy against a LoRA fake score on the shared base (full student in both).

    python benchmarks/bench_training.py                  # CPU, a 16M-parameter UNet, a few minutes on 2 cores
    python benchmarks/bench_training.py --device cuda --unet sd15   # Stable Diffusion 1.5's UNet shape, random weights

Figures are printed last as `name: value` lines.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"pgsb": REPO / "training" / "train_pg_swiftbrush.py", "sid": REPO / "training" / "train_sid.py"}
_SMALL_BLOCKS = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
_SD15_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
UNETS = {
    "small": {"block_out_channels": (64, 128, 256), "layers_per_block": 1, "attention_head_dim": 8,
              "norm_num_groups": 8, "sample_size": 16, "cross_attention_dim": 32, **_SMALL_BLOCKS},
    "sd15": {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "attention_head_dim": 8,
             "sample_size": 64, "cross_attention_dim": 768, **_SD15_BLOCKS},
}  # fmt: skip


def build_teacher(path: str, unet_size: str) -> None:
    r"""A Stable-Diffusion-format teacher: tiny VAE / text encoder / tokenizer, a UNet of the chosen shape."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffusers_onestep.testing_utils import get_dummy_teacher_components

    config = UNETS[unet_size]
    components = get_dummy_teacher_components(cross_attention_dim=config["cross_attention_dim"])
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(in_channels=4, out_channels=4, **config)
    StableDiffusionPipeline(**components).save_pretrained(path, safe_serialization=True)


def load_script(method: str = "pgsb"):
    spec = importlib.util.spec_from_file_location(SCRIPTS[method].stem, SCRIPTS[method])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def script_argv(teacher: str, output_dir: str, args, lora: bool, steps: int, method: str = "pgsb") -> list[str]:
    r"""PG-SB: `lora` is a LoRA student (else full). SiD: `lora` is a LoRA fake score (else a full copy), full student."""
    argv = [
        f"--pretrained_teacher_model_name_or_path={teacher}",
        f"--train_prompts={output_dir}/prompts.txt",
        f"--output_dir={output_dir}",
        f"--train_batch_size={args.batch_size}",
        f"--max_train_steps={steps}",
        "--checkpointing_steps=100000",
        "--report_to=none",
        "--mixed_precision=no",
        "--seed=0",
    ]
    if method == "sid":
        argv += ["--guidance_scale=2.0"]
        if lora:
            argv += [f"--fake_score_lora_rank={args.fake_score_lora_rank}"]
    else:
        argv += [f"--fake_score_lora_rank={args.fake_score_lora_rank}",
                 f"--fake_score_lora_alpha={2 * args.fake_score_lora_rank}"]  # fmt: skip
        if lora:
            argv += [f"--student_lora_rank={args.student_lora_rank}", "--learning_rate=1e-4"]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    Path(output_dir, "prompts.txt").write_text("a photo of a cat\na photo of a dog\nthe digit seven\n")
    return argv


def time_iterations(script, teacher: str, args, lora: bool, method: str = "pgsb") -> float:
    r"""Median seconds per iteration of the real script, measured between consecutive steps of its loop."""
    from diffusers_onestep.training_utils import distillation

    stamps = []
    original = distillation.training_loop

    def timed_loop(*a, **k):
        for step in original(*a, **k):
            stamps.append(time.perf_counter())
            yield step
        stamps.append(time.perf_counter())

    distillation.training_loop = timed_loop
    try:
        with tempfile.TemporaryDirectory() as out:
            script.main(script_argv(teacher, out, args, lora, args.warmup + args.steps, method))
    finally:
        distillation.training_loop = original
    if args.device == "cuda":
        torch.cuda.synchronize()
    deltas = sorted(b - a for a, b in zip(stamps[args.warmup :], stamps[args.warmup + 1 :]))
    return deltas[len(deltas) // 2]


def _pass_setup(teacher_path: str, args, *, student_lora_rank: int, fake_score_lora_rank: int, t_init: int):
    r"""The networks and inputs the passes are timed on: student / teacher / fake-score views (the fake score a LoRA
    on the shared base, or with rank 0 a full copy), the student's scheduler, noise, text embeddings, timesteps."""
    from types import SimpleNamespace

    from diffusers_onestep.losses import Denoiser
    from diffusers_onestep.schedulers import ConsistencyStudentScheduler
    from diffusers_onestep.training_utils import (
        FAKE_SCORE_ADAPTER,
        AdapterView,
        build_distillation_unets,
        load_teacher,
    )

    device = torch.device(args.device)
    teacher = load_teacher(teacher_path, device=device)
    unets = build_distillation_unets(
        teacher.unet, student_lora_rank=student_lora_rank, fake_score_lora_rank=fake_score_lora_rank,
        fake_score_lora_alpha=8,
    )  # fmt: skip
    acp = teacher.scheduler.alphas_cumprod.to(device)
    if unets.fake_score is None:
        fake = Denoiser(AdapterView(unets.teacher, FAKE_SCORE_ADAPTER), acp)
    else:
        fake = Denoiser(AdapterView(unets.fake_score, None), acp)
    size, b = unets.teacher.config.sample_size, args.batch_size
    return SimpleNamespace(
        student=AdapterView(unets.student, unets.student_adapter), teacher=Denoiser(AdapterView(unets.teacher, None), acp),
        fake=fake, scheduler=ConsistencyStudentScheduler.from_config(teacher.scheduler.config, t_init=t_init),
        z=torch.randn(b, 4, size, size, device=device), t=torch.full((b,), 500, device=device), b=b,
        embeds=torch.randn(b, 16, unets.teacher.config.cross_attention_dim, device=device),
    )


def time_passes(teacher_path: str, args, lora: bool) -> dict[str, float]:
    r"""Median seconds of each pass of one PG-SB iteration, timed alone on the same UNets."""
    from diffusers_onestep.losses import student_generate

    rank = args.student_lora_rank if lora else 0
    p = _pass_setup(teacher_path, args, student_lora_rank=rank, fake_score_lora_rank=args.fake_score_lora_rank,
                    t_init=999)  # fmt: skip
    student, teacher_d, fake_d, scheduler, z, embeds, t, b = (
        p.student, p.teacher, p.fake, p.scheduler, p.z, p.embeds, p.t, p.b
    )

    def student_pass():
        student_generate(student, scheduler, z, embeds).square().mean().backward()

    def teacher_pass():
        with torch.no_grad():
            teacher_d(z, t, embeds, torch.full((b,), 2.0), embeds)

    def fake_pass():
        with torch.no_grad():
            fake_d(z, t, embeds, torch.full((b,), 2.0), embeds)

    def fake_train_pass():
        fake_d(z, t, embeds).eps.square().mean().backward()

    timings = {}
    for name, fn in [("student_fwd_bwd", student_pass), ("teacher_cfg_fwd", teacher_pass)]:
        timings[name] = _median_time(fn, args)
    timings["fake_score_cfg_fwd"] = _median_time(fake_pass, args)
    timings["fake_score_fwd_bwd"] = _median_time(fake_train_pass, args)
    return timings


def time_sid_passes(teacher_path: str, args, lora: bool) -> dict[str, float]:
    r"""Median seconds of each pass of one SiD iteration (full student; `lora`: LoRA fake score), timed alone."""
    from diffusers_onestep.losses import student_generate

    p = _pass_setup(teacher_path, args, student_lora_rank=0,
                    fake_score_lora_rank=args.fake_score_lora_rank if lora else 0, t_init=625)  # fmt: skip
    student, teacher_d, fake_d, scheduler, z, embeds, t = p.student, p.teacher, p.fake, p.scheduler, p.z, p.embeds, p.t
    k = torch.full((p.b,), 2.0)

    def student_no_grad():
        with torch.no_grad():
            student_generate(student, scheduler, z, embeds)

    def fake_train():
        fake_d(z, t, embeds, k, embeds).eps.square().mean().backward()

    def generator_chain():
        x = student_generate(student, scheduler, z, embeds)
        (teacher_d(x, t, embeds, k, embeds).x0 - fake_d(x, t, embeds, k, embeds).x0).square().mean().backward()

    return {"student_fwd": _median_time(student_no_grad, args), "fake_score_cfg_fwd_bwd": _median_time(fake_train, args),
            "generator_chain_fwd_bwd": _median_time(generator_chain, args)}  # fmt: skip


def _median_time(fn, args) -> float:
    samples = []
    for i in range(args.warmup + args.steps):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def _reset_peak_rss() -> None:
    # VmHWM is per address space (ru_maxrss is not: a child started from a big parent inherits the parent's peak)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure_memory(teacher: str, args, lora: bool, method: str = "pgsb") -> float:
    r"""Peak memory (MiB) of a short run; called in a fresh process (`--_memory_mode`)."""
    script = load_script(method)
    with tempfile.TemporaryDirectory() as out:
        argv = script_argv(teacher, out, args, lora, 2, method)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            script.main(argv)
            return torch.cuda.max_memory_allocated() / 2**20
        _reset_peak_rss()
        before = _status_mib("VmRSS")
        script.main(argv)
        return _status_mib("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--unet", default="small", choices=sorted(UNETS))
    parser.add_argument("--methods", nargs="+", default=["pgsb", "sid"], choices=sorted(SCRIPTS))
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--student_lora_rank", type=int, default=16)
    parser.add_argument("--fake_score_lora_rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadiest on a shared machine)")
    parser.add_argument("--teacher", default=None, help="an existing teacher directory (skips building one)")
    parser.add_argument("--_memory_mode", choices=["lora", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--_method", choices=sorted(SCRIPTS), default="pgsb", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args._memory_mode:
        peak = measure_memory(args.teacher, args, args._memory_mode == "lora", args._method)
        print(json.dumps({"peak_mib": peak}))
        return

    passes_of = {"pgsb": time_passes, "sid": time_sid_passes}
    results, memory = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.teacher or os.path.join(tmp, "teacher")
        if args.teacher is None:
            build_teacher(teacher, args.unet)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for method in args.methods:
            script = load_script(method)
            for mode in ("full", "lora"):
                iteration = time_iterations(script, teacher, args, lora=mode == "lora", method=method)
                results[method, mode] = (iteration, passes_of[method](teacher, args, lora=mode == "lora"))
                cmd = [sys.executable, __file__, f"--_memory_mode={mode}", f"--_method={method}", f"--teacher={teacher}"]
                cmd += [f"--device={args.device}", f"--batch_size={args.batch_size}", f"--threads={args.threads}"]
                cmd += [f"--student_lora_rank={args.student_lora_rank}"]
                cmd += [f"--fake_score_lora_rank={args.fake_score_lora_rank}"]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                memory[method, mode] = json.loads(out.strip().splitlines()[-1])["peak_mib"]

    print(f"\ndevice={args.device} unet={args.unet} batch_size={args.batch_size} threads={args.threads}")
    print("modes: pgsb full / lora = full / LoRA student; sid full / lora = full-copy / LoRA fake score")
    for (method, mode), (iteration, passes) in results.items():
        print(f"[{method} {mode}] passes alone: " + ", ".join(f"{k}={v * 1e3:.1f} ms" for k, v in passes.items()))
    print()
    for (method, mode), (iteration, passes) in results.items():
        print(f"{method}_{mode}_iteration_ms: {iteration * 1e3:.1f}")
        print(f"{method}_{mode}_passes_sum_ms: {sum(passes.values()) * 1e3:.1f}")
        print(f"{method}_{mode}_iteration_over_passes: {iteration / sum(passes.values()):.3f}")
    for method in args.methods:
        print(f"{method}_peak_memory_lora_mib: {memory[method, 'lora']:.1f}")
        print(f"{method}_peak_memory_full_mib: {memory[method, 'full']:.1f}")
        print(f"{method}_peak_memory_lora_over_full: {memory[method, 'lora'] / memory[method, 'full']:.3f}")


if __name__ == "__main__":
    main()
