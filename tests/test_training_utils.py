"""Unit tests of diffusers_onestep.training_utils: presets, prompt data, adapter switching, checkpoints, Hub helpers."""

import json
import os

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from diffusers_onestep.testing_utils import get_dummy_components
from diffusers_onestep.training_utils import (
    FAKE_SCORE_ADAPTER,
    STUDENT_ADAPTER,
    AdapterView,
    NonFiniteError,
    TrainingArguments,
    TrainingTimer,
    build_distillation_unets,
    checkpoint_problem,
    format_command,
    list_checkpoints,
    load_prompts,
    parse_args,
    prompt_batches,
    register_checkpoint_hooks,
    resume_from_checkpoint,
    save_checkpoint,
    training_loop,
    validate_training_args,
)


def test_preset_defaults_are_overridden_by_explicit_flags():
    (args,) = parse_args((TrainingArguments,), ["--preset", "sd21", "--learning_rate", "3e-6"], presets={"sd21": {
        "learning_rate": 1e-6, "max_train_steps": 7, "pretrained_teacher_model_name_or_path": "org/sd21"}})  # fmt: skip
    assert (args.learning_rate, args.max_train_steps) == (3e-6, 7)
    assert args.pretrained_teacher_model_name_or_path == "org/sd21"
    with pytest.raises(ValueError, match="does not define"):
        parse_args((TrainingArguments,), ["--preset", "x"], presets={"x": {"not_a_flag": 1}})


def test_validate_training_args_names_the_argument(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n")
    base = ["--pretrained_teacher_model_name_or_path=org/t", f"--train_prompts={tmp_path / 'p.txt'}"]
    for flag, match in [
        ("--checkpoints_total_limit=0", "--checkpoints_total_limit"),
        ("--train_batch_size=0", "--train_batch_size"),
        ("--t_init=1000", "--t_init"),
        ("--report_to=wandb", "--report_to wandb"),  # not installed here
        ("--max_train_minutes=0", "--max_train_minutes"),
    ]:
        with pytest.raises(ValueError, match=match):
            (args,) = parse_args((TrainingArguments,), [*base, flag])
            validate_training_args(args)
    with pytest.raises(SystemExit):  # argparse's choices: it names the flag and the allowed clocks
        parse_args((TrainingArguments,), [*base, "--train_clock=gpu"])


def test_load_prompts_from_text_csv_json_and_dataset(tmp_path):
    import datasets

    (tmp_path / "p.txt").write_text("a cat\n\n  a dog \n")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    (tmp_path / "p.csv").write_text("id,caption\n1,a cat\n2,a dog\n")
    assert load_prompts(str(tmp_path / "p.csv")) == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": t, "other": 1}) for t in ("x", "y")))
    assert load_prompts(str(tmp_path / "p.jsonl"), column="text") == ["x", "y"]
    with pytest.raises(ValueError, match="--prompt_column"):
        load_prompts(str(tmp_path / "p.jsonl"), column="missing")
    datasets.Dataset.from_dict({"prompt": ["u", "v"]}).save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(str(tmp_path / "ds")) == ["u", "v"]
    (tmp_path / "p.pdf").write_text("x")
    with pytest.raises(ValueError, match="--train_prompts"):
        load_prompts(str(tmp_path / "p.pdf"))


def test_prompt_batches_are_deterministic_resumable_and_rank_consistent():
    prompts = [f"p{i}" for i in range(7)]
    stream = prompt_batches(prompts, 4, seed=3)
    first = [next(stream) for _ in range(6)]
    resumed = prompt_batches(prompts, 4, seed=3, start=4)
    assert [next(resumed) for _ in range(2)] == first[4:]
    # every epoch is a permutation: each prompt once per 7 consecutive draws
    flat = [p for batch in first for p in batch]
    assert sorted(flat[:7]) == sorted(prompts) and sorted(flat[7:14]) == sorted(prompts)
    assert first != [next(prompt_batches(prompts, 4, seed=4)) for _ in range(1)] * 6


def _forward(view):
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    return view(x, torch.tensor([10, 500]), encoder_hidden_states=e).sample


def test_shared_base_switches_adapters_and_routes_gradients():
    unet = get_dummy_components()["unet"]
    with torch.no_grad():
        reference = _forward(unet)
    unets = build_distillation_unets(
        unet, student_lora_rank=2, student_lora_alpha=4, fake_score_lora_rank=2, fake_score_lora_alpha=2
    )
    assert unets.shared and unets.student is unets.teacher
    base = [p for n, p in unets.teacher.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)
    with torch.no_grad():  # make both adapters non-trivial
        for p in unets.student_parameters + unets.fake_score_parameters:
            p.add_(0.1 * torch.randn_like(p))
    teacher, student = AdapterView(unets.teacher, None), AdapterView(unets.teacher, STUDENT_ADAPTER)
    fake = AdapterView(unets.teacher, FAKE_SCORE_ADAPTER)
    with torch.no_grad():
        out_teacher, out_student, out_fake = _forward(teacher), _forward(student), _forward(fake)
    torch.testing.assert_close(out_teacher, reference)  # adapters off: exactly the base UNet
    assert not torch.allclose(out_student, out_teacher) and not torch.allclose(out_fake, out_student)

    for view, trained, frozen in [
        (student, unets.student_parameters, unets.fake_score_parameters),
        (fake, unets.fake_score_parameters, unets.student_parameters),
    ]:
        unets.teacher.zero_grad(set_to_none=True)
        _forward(view).square().mean().backward()
        assert all(p.grad is not None for p in trained)
        assert all(p.grad is None for p in frozen) and all(p.grad is None for p in base)
        # peft's set_adapter would have switched the other adapter's requires_grad off
        assert all(p.requires_grad for p in unets.student_parameters + unets.fake_score_parameters)


def test_full_student_is_a_float32_copy_next_to_the_fake_score_adapter():
    unet = get_dummy_components()["unet"]
    unets = build_distillation_unets(
        unet, student_lora_rank=0, fake_score_lora_rank=2, fake_score_lora_alpha=4, dtype=torch.bfloat16
    )
    assert not unets.shared and unets.student is not unets.teacher
    assert all(p.dtype == torch.float32 and p.requires_grad for p in unets.student.parameters())
    assert all(p.dtype == torch.float32 for p in unets.fake_score_parameters)
    assert unets.teacher.conv_in.weight.dtype == torch.bfloat16 and not unets.teacher.conv_in.weight.requires_grad


def test_checkpoints_are_atomic_limited_and_never_non_finite(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    register_checkpoint_hooks(accelerator)
    params = list(model.parameters())
    for step in (1, 2, 3):
        save_checkpoint(accelerator, str(tmp_path), step, total_limit=2, params=params)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-2", "checkpoint-3"]
    assert set(load_file(tmp_path / "checkpoint-3" / "trainable_0.safetensors")) == {"weight", "bias"}
    saved = model.weight.detach().clone()

    # a save killed half-way leaves a hidden partial directory that is neither listed nor resumed from
    (tmp_path / ".checkpoint-4.partial").mkdir()
    (tmp_path / ".checkpoint-4.partial" / "trainable_0.safetensors").write_bytes(b"truncated")
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="checkpoint-4"):
        save_checkpoint(accelerator, str(tmp_path), 4, total_limit=2, params=params)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-2", "checkpoint-3"]
    assert resume_from_checkpoint(accelerator, str(tmp_path), "latest") == 3
    torch.testing.assert_close(model.weight.detach(), saved)
    assert not (tmp_path / ".checkpoint-4.partial").exists()
    with pytest.raises(ValueError, match="--resume_from_checkpoint"):
        resume_from_checkpoint(accelerator, str(tmp_path), str(tmp_path / "nowhere"))
    assert resume_from_checkpoint(accelerator, str(tmp_path / "empty"), "latest") == 0


def test_format_command_hides_the_hub_token():
    command = format_command(["--hub_token", "hf_abc", "--hub_token=hf_def", "--validation_prompts", "a cat"], "t.py")
    assert "hf_abc" not in command and "hf_def" not in command
    assert command == "accelerate launch t.py --hub_token *** --hub_token=*** --validation_prompts 'a cat'"


def test_gradient_checkpointing_with_shared_base_needs_the_student_active_in_backward():
    def student_grads(checkpointing: bool, reactivate: bool):
        unet = get_dummy_components()["unet"]
        unets = build_distillation_unets(
            unet, student_lora_rank=2, student_lora_alpha=4, fake_score_lora_rank=2,
            gradient_checkpointing=checkpointing,
        )  # fmt: skip
        torch.manual_seed(1)
        with torch.no_grad():
            for p in unets.student_parameters + unets.fake_score_parameters:
                p.add_(0.1 * torch.randn_like(p))
        student = AdapterView(unets.teacher, STUDENT_ADAPTER)
        loss = _forward(student).square().mean()
        with torch.no_grad():  # the teacher / fake-score passes of the student step
            _forward(AdapterView(unets.teacher, FAKE_SCORE_ADAPTER))
        if reactivate:
            student.activate()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in unets.student_parameters])

    expected = student_grads(checkpointing=False, reactivate=False)
    torch.testing.assert_close(student_grads(checkpointing=True, reactivate=True), expected)
    # without re-activation, checkpointing recomputes the student's blocks with the fake score's adapter
    assert not torch.allclose(student_grads(checkpointing=True, reactivate=False), expected)


def test_log_validation_logs_grayscale_images_to_tensorboard(tmp_path):
    """One-channel students (the digits VAE) give mode-"L" images; TensorBoard's NHWC logging needs a channel axis."""
    import types

    import PIL.Image

    from diffusers_onestep.training_utils import log_validation

    def pipeline(prompt, num_images_per_prompt, generator, output_type):
        return types.SimpleNamespace(images=[PIL.Image.new("L", (8, 8), 128)] * num_images_per_prompt)

    logged = []
    writer = types.SimpleNamespace(add_images=lambda tag, array, step, dataformats: logged.append(array.shape))
    accelerator = types.SimpleNamespace(trackers=[types.SimpleNamespace(name="tensorboard", writer=writer)])
    images, path = log_validation(
        pipeline, prompts=["a", "b"], accelerator=accelerator, step=3, output_dir=str(tmp_path), num_images_per_prompt=2
    )
    assert logged == [(4, 8, 8, 3)] and len(images) == 4 and os.path.isfile(path)


def _checkpointed_model(tmp_path):
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    register_checkpoint_hooks(accelerator)
    return accelerator, model


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, caplog):
    accelerator, model = _checkpointed_model(tmp_path)
    weights = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(step))
        save_checkpoint(accelerator, str(tmp_path), step, params=list(model.parameters()))
        weights[step] = model.weight.detach().clone()
    manifest = json.loads((tmp_path / "checkpoint-3" / "checkpoint.json").read_text())
    assert manifest["step"] == 3 and "trainable_0.safetensors" in manifest["files"]

    # latest truncated (its manifest catches it), the one before corrupted in place (its load fails)
    latest = tmp_path / "checkpoint-3" / "trainable_0.safetensors"
    latest.write_bytes(latest.read_bytes()[:20])
    middle = tmp_path / "checkpoint-2" / "trainable_0.safetensors"
    middle.write_bytes(b"\xff" * len(middle.read_bytes()))
    with torch.no_grad():
        model.weight.zero_()
    assert resume_from_checkpoint(accelerator, str(tmp_path), "latest") == 1
    torch.testing.assert_close(model.weight.detach(), weights[1])
    assert "Skipping" in caplog.text and "checkpoint-3" in caplog.text and "checkpoint-2" in caplog.text
    # an explicit corrupt checkpoint is an error, not a silent fallback
    with pytest.raises(ValueError, match="checkpoint-3 is incomplete or corrupt"):
        resume_from_checkpoint(accelerator, str(tmp_path), str(tmp_path / "checkpoint-3"))
    latest.unlink()  # nothing readable at all: a clear error
    (tmp_path / "checkpoint-1" / "trainable_0.safetensors").unlink()
    with pytest.raises(ValueError, match="No checkpoint in .* can be resumed from"):
        resume_from_checkpoint(accelerator, str(tmp_path), "latest")


def test_old_checkpoints_are_hidden_before_they_are_deleted(tmp_path, monkeypatch):
    import shutil

    from diffusers_onestep.training_utils import loop

    accelerator, model = _checkpointed_model(tmp_path)
    save_checkpoint(accelerator, str(tmp_path), 1, params=list(model.parameters()))
    deleted = []
    real_rmtree = shutil.rmtree

    def dying_rmtree(path, *args, **kwargs):
        if str(path).endswith(".trash") and os.path.exists(path):
            deleted.append(os.path.basename(path))
            raise KeyboardInterrupt  # killed while deleting the old checkpoint
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(loop.shutil, "rmtree", dying_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, str(tmp_path), 2, total_limit=1, params=list(model.parameters()))
    monkeypatch.setattr(loop.shutil, "rmtree", real_rmtree)
    assert deleted == [".checkpoint-1.trash"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["checkpoint-2"]
    assert resume_from_checkpoint(accelerator, str(tmp_path), "latest") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # the leftover trash is cleaned up


def test_nan_guard_bounds_skips_per_window_and_absurd_weights_are_refused():
    from diffusers_onestep.training_utils import NaNGuard, check_weights

    guard = NaNGuard("skip", max_skips=2, window=5)
    for step in (0, 0, 1, 6, 7):  # step 0 counted once; 0 and 1 have left the window by step 7
        guard.skip(step, "bad")
    with pytest.raises(NonFiniteError, match="3 of the last 5 optimizer steps were skipped"):
        guard.skip(8, "bad")
    with pytest.raises(NonFiniteError, match="--nan_policy skip"):
        NaNGuard("raise").skip(0, "bad")
    check_weights(None, [torch.full((2,), 6e4)], "x")  # large but representable in float16: kept
    with pytest.raises(NonFiniteError, match="exceed float16's range"):
        check_weights(None, [torch.ones(2), torch.tensor([1e28])], "the final model")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        check_weights(None, [torch.tensor([float("inf")])], "checkpoint-3")


def test_prompt_sources_dataset_name_and_train_data_dir(tmp_path):
    import datasets

    from diffusers_onestep.training_utils import load_training_prompts

    datasets.Dataset.from_dict({"caption": ["u", "v"]}).save_to_disk(str(tmp_path / "ds"))
    args = TrainingArguments(dataset_name=str(tmp_path / "ds"))
    assert load_training_prompts(args) == ["u", "v"]
    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    (folder / "metadata.csv").write_text("file_name,text\n0.png,a cat\n1.png,a dog\n")
    assert load_training_prompts(TrainingArguments(train_data_dir=str(tmp_path / "images"))) == ["a cat", "a dog"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--train_data_dir.*metadata.jsonl"):
        load_training_prompts(TrainingArguments(train_data_dir=str(tmp_path / "empty")))


def test_model_card_writes_n_a_for_non_finite_metrics_and_picks_the_device_at_runtime(tmp_path, tiny_teacher_dir):
    from diffusers_onestep import ConsistencyStudentScheduler, OneStepPipeline
    from diffusers_onestep.training_utils import save_model_card

    pipe = OneStepPipeline.from_teacher(tiny_teacher_dir, unet=os.path.join(tiny_teacher_dir, "unet"))
    pipe.scheduler = ConsistencyStudentScheduler.from_config(pipe.scheduler.config, t_init=999)
    pipe.save_pretrained(tmp_path)
    card = save_model_card(
        str(tmp_path), base_model="org/teacher", method_name="m", paper="p", script="s.py", command="c",
        metrics={"loss": float("nan"), "other": float("inf"), "ok": 0.5}, hyperparameters={"lr": float("nan")},
        t_init=999, input_type="noise", repo_id=str(tmp_path), secrets=["c"],
    )  # fmt: skip
    text = (tmp_path / "README.md").read_text()
    assert "| loss | n/a |" in text and "| other | n/a |" in text and "| ok | 0.5 |" in text and "| lr | n/a |" in text
    assert '.to("cuda")' not in text and "torch.cuda.is_available()" in text
    assert not (tmp_path / ".README.md.partial").exists() and card.data.base_model == "org/teacher"
    # the card's usage snippet runs as written (here on CPU, from the local directory as its repo id)
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(snippet, "model_card_snippet", "exec"), namespace)
    assert namespace["device"] in ("cpu", "cuda", "mps") and namespace["image"].size == (16, 16)


def test_model_card_names_the_backbone_pipeline_and_network(tmp_path):
    from diffusers_onestep.training_utils import save_model_card

    for pipeline_class, network in (("OneStepPixArtPipeline", "transformer"), ("OneStepXLPipeline", "UNet")):
        save_model_card(
            str(tmp_path), base_model="org/teacher", method_name="m", paper="p", script="s.py", command="c",
            metrics={}, hyperparameters={}, t_init=999, input_type="noise", lora_rank=4, pipeline_class=pipeline_class,
        )  # fmt: skip
        text = (tmp_path / "README.md").read_text()
        assert f"{pipeline_class}.from_teacher(" in text and f"from diffusers_onestep import {pipeline_class}" in text
        assert f"base model's\n{network};" in text and f"runs its {network} once" in text
        assert "OneStepPipeline." not in text


class _StepTimer(TrainingTimer):
    """A timer whose minutes are 0.1 per finished optimizer step (a deterministic clock for the budget)."""

    def minutes(self):
        return 0.1 * (self.last_step or 0)


def _loop_args(**overrides):
    from types import SimpleNamespace

    values = {"max_train_steps": 12, "gradient_accumulation_steps": 1, "seed": 0, "checkpointing_steps": 7,
              "validation_steps": 1000, "max_train_minutes": None, "train_clock": "wall"}  # fmt: skip
    return SimpleNamespace(**{**values, **overrides})


def test_time_budget_stops_the_loop_with_a_last_checkpoint():
    accelerator = Accelerator(cpu=True)
    saved, timer = [], _StepTimer()
    steps = [s.global_step for s in training_loop(accelerator, _loop_args(max_train_minutes=0.95), 0, saved.append,
                                                  None, timer)]  # fmt: skip
    # 0.1 minute per step: the budget is spent after step 10, which is checkpointed (7 was on the cadence)
    assert steps == list(range(10)) and saved == [7, 10] and timer.last_step == 10
    saved, timer = [], _StepTimer()
    steps = [s.global_step for s in training_loop(accelerator, _loop_args(), 0, saved.append, None, timer)]
    assert steps == list(range(12)) and saved == [7] and timer.last_step == 12  # no budget: max_train_steps
    saved = []
    list(training_loop(accelerator, _loop_args(max_train_minutes=0.7, checkpointing_steps=7), 0, saved.append, None,
                       _StepTimer()))  # fmt: skip
    assert saved == [7]  # stopped on a checkpoint step: not saved twice


def test_training_timer_clocks_and_checkpoint_manifest_info(tmp_path):
    with pytest.raises(ValueError, match="'wall' or 'cpu'"):
        TrainingTimer("gpu")
    cpu = TrainingTimer("cpu")
    sum(i * i for i in range(200_000))  # some CPU work
    assert cpu.minutes() > 0 and TrainingTimer("wall").minutes() >= 0
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    register_checkpoint_hooks(accelerator)
    path = save_checkpoint(accelerator, str(tmp_path), 3, params=list(model.parameters()),
                           info={"train_minutes": 1.5, "train_clock": "cpu"})  # fmt: skip
    manifest = json.loads((tmp_path / "checkpoint-3" / "checkpoint.json").read_text())
    assert (manifest["step"], manifest["train_minutes"], manifest["train_clock"]) == (3, 1.5, "cpu")
    assert checkpoint_problem(path) is None  # the extra keys do not disturb the completeness check
