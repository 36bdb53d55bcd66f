"""End-to-end tests of training/train_pg_swiftbrush.py: `main([...])` in-process against a tiny teacher directory."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from diffusers_onestep import ConsistencyStudentScheduler, OneStepPipeline
from diffusers_onestep.losses import PGSwiftBrushLoss
from diffusers_onestep.training_utils import list_checkpoints


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "train_pg_swiftbrush.py"
PROMPTS = ["a photo of a cat", "a photo of a dog", "the digit seven", "a handwritten digit", "a pet"]
# subprocesses: one thread, as conftest.py sets in-process (two OpenMP threads make tiny models much slower)
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_pg_swiftbrush", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def _argv(teacher, prompts, output_dir, *extra):
    return [
        f"--pretrained_teacher_model_name_or_path={teacher}",
        f"--train_prompts={prompts}",
        f"--output_dir={output_dir}",
        "--train_batch_size=2",
        "--seed=0",
        "--fake_score_lora_rank=4",
        "--fake_score_lora_alpha=8",
        "--learning_rate=1e-3",
        "--report_to=none",
        "--mixed_precision=no",
        *extra,
    ]


def _sample(pipe, seed=0):
    return pipe("a photo of a cat", generator=torch.Generator().manual_seed(seed), output_type="pt").images


def test_full_student_trains_saves_and_reloads(script, tiny_teacher_dir, prompts_file, tmp_path):
    out = tmp_path / "full"
    argv = _argv(tiny_teacher_dir, prompts_file, out, "--max_train_steps=2", "--gradient_accumulation_steps=2")
    argv += ["--checkpointing_steps=1", "--checkpoints_total_limit=1", "--use_ema", "--report_to=tensorboard"]
    argv += ["--validation_prompts", "a photo of a cat", "a pet", "--validation_steps=1", "--num_validation_images=2"]
    argv += ["--hub_base_model=org/tiny-teacher"]
    trained = script.main(argv)

    # the output is a OneStepPipeline directory that reloads to the same images
    reloaded = OneStepPipeline.from_pretrained(out)
    assert isinstance(reloaded.scheduler, ConsistencyStudentScheduler) and reloaded.scheduler.config.t_init == 999
    torch.testing.assert_close(_sample(reloaded), _sample(trained))
    # training moved the student away from the teacher
    teacher_unet = OneStepPipeline.from_teacher(tiny_teacher_dir, unet=os.path.join(tiny_teacher_dir, "unet")).unet
    assert any(not torch.equal(a, b) for a, b in zip(teacher_unet.parameters(), reloaded.unet.parameters()))
    # checkpoint cadence and total limit; validation grids on disk and in TensorBoard
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert sorted(os.listdir(out / "validation")) == ["step-000001.png", "step-000002.png"]
    assert list(out.glob("logs/**/events.out.tfevents.*"))

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.base_model == "org/tiny-teacher"
    assert {"pg-swiftbrush", "diffusers-onestep", "text-to-image"} <= set(card.data.tags)
    assert "import diffusers_onestep" in card.text and "OneStepPipeline.from_pretrained" in card.text
    assert "accelerate launch training/train_pg_swiftbrush.py" in card.text and "--use_ema" in card.text
    assert "| loss_vsd |" in card.text and "validation/step-000002.png" in card.text


def _tiny_clip(path):
    from transformers import CLIPConfig, CLIPModel

    from diffusers_onestep.testing_utils import build_clip_tokenizer

    torch.manual_seed(0)
    text = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    text.update(vocab_size=1100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = {"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    vision.update(image_size=16, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    build_clip_tokenizer(save_directory=path)
    return str(path)


def test_lora_student_shares_base_and_reloads_with_alpha(script, tiny_teacher_dir, prompts_file, tmp_path):
    out = tmp_path / "lora"
    clip = _tiny_clip(tmp_path / "clip")
    argv = _argv(tiny_teacher_dir, prompts_file, out, "--max_train_steps=2", "--student_lora_rank=4")
    argv += ["--student_lora_alpha=16", "--learning_rate=3e-2", f"--clip_model_name_or_path={clip}"]
    trained = script.main(argv)

    # one UNet: the frozen base with the student and fake-score adapters
    assert set(trained.unet.peft_config) == {"student", "fake_score"}
    assert sorted(os.listdir(out)) == ["README.md", "pytorch_lora_weights.safetensors", "scheduler"]
    reloaded = OneStepPipeline.from_teacher(tiny_teacher_dir, lora=str(out), t_init=999)
    (adapter,) = reloaded.unet.peft_config.values()
    assert (adapter.r, adapter.lora_alpha) == (4, 16)
    expected = _sample(trained)
    torch.testing.assert_close(_sample(reloaded), expected, rtol=1e-4, atol=1e-5)
    # the LoRA matters at that tolerance: the same adapter with scaling alpha/r = 1 instead of 4 differs
    reloaded.set_adapters(list(reloaded.unet.peft_config), adapter_weights=[0.25])
    assert (_sample(reloaded) - expected).abs().max() > 1e-3
    assert ConsistencyStudentScheduler.from_pretrained(out, subfolder="scheduler").config.t_init == 999
    card = ModelCard.load(out / "README.md")
    assert "lora" in card.data.tags and "lora=" in card.text and "| loss_clip |" in card.text
    assert card.data.base_model is None  # a local teacher is not valid Hub metadata (see --hub_base_model)


# kill / resume, NaN and unreachable-Hub tests run for every script in tests/test_training_faults.py


def test_push_to_hub_uploads_the_output_dir(
    script, tiny_teacher_dir, prompts_file, tmp_path, monkeypatch, capfd, caplog
):
    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(**kwargs):
        calls["upload_folder"] = kwargs
        calls["files"] = sorted(os.listdir(kwargs["folder_path"]))

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "hub"
    argv = _argv(tiny_teacher_dir, prompts_file, out, "--max_train_steps=1", "--push_to_hub", "--report_to=tensorboard")
    argv += ["--checkpointing_steps=1", "--validation_prompts", "a pet", "--validation_steps=1"]
    script.main(argv + ["--hub_model_id=someone/pgsb-tiny", "--hub_token", "hf_SECRET123", "--student_lora_rank=2"])

    repo_id, kwargs = calls["create_repo"]
    assert repo_id == "someone/pgsb-tiny" and kwargs["token"] == "hf_SECRET123" and kwargs["exist_ok"]
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "someone/pgsb-tiny" and Path(upload["folder_path"]) == out
    assert "checkpoint-*" in upload["ignore_patterns"]
    assert {"README.md", "pytorch_lora_weights.safetensors", "scheduler"} <= set(calls["files"])
    card = (out / "README.md").read_text()
    assert "hf_SECRET123" not in card and "--hub_token '***'" not in card and "--hub_token ***" in card
    assert 'lora="someone/pgsb-tiny"' in card
    captured = capfd.readouterr()
    assert "hf_SECRET123" not in captured.out + captured.err + caplog.text
    # every file the run wrote (card, checkpoint, TensorBoard events, validation grid, weights) is free of it
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any("tfevents" in p.name for p in written) and any("checkpoint-1" in str(p) for p in written)
    assert [p for p in written if b"hf_SECRET123" in p.read_bytes()] == []
    # a token on the command line is accepted but discouraged, as diffusers' scripts do
    assert "`--hub_token` was given on the command line" in caplog.text and "HF_TOKEN" in caplog.text


def test_secret_flags_are_masked_whatever_their_spelling():
    from diffusers_onestep.training_utils import format_command, mask_secrets

    argv = ["--hub-token", "hf_abcdefghij1", "--HUB_TOKEN=hf_abcdefghij2", "--wandb_api_key", "k3y-value"]
    argv += ["--validation_prompts", "a cat hf_abcdefghij4", "--my_secret=s3cr3t"]
    command = format_command(argv, "t.py")
    for secret in ("hf_abcdefghij1", "hf_abcdefghij2", "k3y-value", "hf_abcdefghij4", "s3cr3t"):
        assert secret not in command
    assert command.startswith("accelerate launch t.py --hub-token *** --HUB_TOKEN=*** --wandb_api_key ***")
    assert mask_secrets("token=abcd1234 and hf_zzzzzzzzzz", ["abcd1234"]) == "token=*** and ***"


@pytest.fixture(scope="module")
def bin_only_teacher(tiny_teacher_dir, tmp_path_factory):
    """The tiny teacher with its UNet weights as a pickle (`.bin`) only."""
    import shutil

    from diffusers import UNet2DConditionModel

    path = tmp_path_factory.mktemp("bin-teacher") / "teacher"
    shutil.copytree(tiny_teacher_dir, path)
    unet = UNet2DConditionModel.from_pretrained(path / "unet")
    (path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(path / "unet", safe_serialization=False)
    return str(path)


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--resolution=0"], "`--resolution` must be >= 1, got 0"),
        (["--resolution=-16"], "`--resolution` must be >= 1, got -16"),
        (["--resolution=6"], "`--resolution` must be a multiple of 4 for this teacher"),  # VAE 2 x UNet 2
        (["--fixed_guidance_scale=-3"], "`--fixed_guidance_scale` must be >= 0, got -3"),
        (["--fake_score_lora_rank=0"], "`--fake_score_lora_rank` must be >= 1, got 0"),
        (["--learning_rate=inf"], "`--learning_rate` must be a finite number > 0, got inf"),
        (["--learning_rate=nan"], "`--learning_rate` must be a finite number > 0, got nan"),
        (["--seed=-5"], r"`--seed` must be in \[0, 4294967295\], got -5"),
        (["--clip_model_name_or_path=/nowhere/clip"], "`--clip_model_name_or_path` '/nowhere/clip': no such directory"),
        (["--train_prompts=missing.txt"], "`--train_prompts` 'missing.txt': no such file"),
        (["--uncond_prob=1.5"], r"`--uncond_prob` must be in \[0, 1\], got 1.5"),
        (["--guidance_scale_min=5"], "guidance_scale_range"),
        (["--student_lora_rank=-1"], "`--student_lora_rank` must be >= 0"),
        (["--fake_score_lora_target_modules=to_q,to_qq"], r"`--fake_score_lora_target_modules`: \['to_qq'\] match no"),
        (["--student_lora_rank=2", "--student_lora_target_modules=nothing"], "`--student_lora_target_modules`: "),
        (["--dataset_name=org/prompts"], "exactly one prompt source"),
    ],
)
def test_bad_flags_fail_naming_the_flag_and_allowed_values(script, tiny_teacher_dir, prompts_file, tmp_path, flags, match):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=match):
        script.main(_argv(tiny_teacher_dir, prompts_file, out, *flags))
    assert not out.exists()  # nothing was created: the error came before any work


def test_teacher_output_dir_and_parser_errors_are_clear(
    script, tiny_teacher_dir, bin_only_teacher, prompts_file, tmp_path, capsys
):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"holds only pickled weights in `unet/`.*safetensors only.*convert"):
        script.main(_argv(bin_only_teacher, prompts_file, out))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="`--output_dir` .*a_file' is a file"):
        script.main(_argv(tiny_teacher_dir, prompts_file, tmp_path / "a_file"))
    with pytest.raises(ValueError, match="--pretrained_teacher_model_name_or_path"):
        script.main(_argv("", prompts_file, out))
    with pytest.raises(ValueError, match="`--pretrained_teacher_model_name_or_path` '/no/teacher': no such directory"):
        script.main(_argv("/no/teacher", prompts_file, out))
    capsys.readouterr()
    # argparse-level errors: one line on stderr, exit status 2, the closest flag named, values never echoed
    for flags, expected in [
        (["--hub_tok", "hf_SECRETabcdefgh123"], "unrecognized argument --hub_tok; did you mean --hub_token?"),
        (["--learning_r=1e-4"], "unrecognized argument --learning_r; did you mean --learning_rate?"),  # no abbrevs
        (["--mixed_precision=fp8"], "--mixed_precision"),
        (["--preset=sd99-nothing"], "sd15-pgsb"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            script.main(_argv(tiny_teacher_dir, prompts_file, out, *flags))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "SECRET" not in err
    assert not out.exists()


def test_diffusers_flag_names_epochs_imagefolder_captions_and_report_to_all(
    script, tiny_teacher_dir, tmp_path, monkeypatch
):
    # an imagefolder whose metadata.jsonl holds the captions (the images themselves are never read)
    data = tmp_path / "imagefolder"
    data.mkdir()
    rows = [{"file_name": f"{i}.png", "text": p} for i, p in enumerate(["a cat", "a dog", "a pet"])]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    calls = []
    original = PGSwiftBrushLoss.generator_loss
    monkeypatch.setattr(PGSwiftBrushLoss, "generator_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    argv = [a for a in _argv(tiny_teacher_dir, "x", out) if not a.startswith(("--train_prompts", "--learning_rate"))]
    argv = [a.replace("--pretrained_teacher_model_name_or_path", "--pretrained_model_name_or_path") for a in argv]
    argv = [a for a in argv if a != "--report_to=none"] + ["--report_to=all", f"--train_data_dir={data}"]
    argv += ["--caption_column=text", "--num_train_epochs=2", "--student_lora_rank=2"]
    script.main(argv)
    assert len(calls) == 4  # 3 captions / batch 2 -> 2 steps per epoch, 2 epochs
    card = (out / "README.md").read_text()
    assert "| learning_rate | 0.0001 |" in card  # the LoRA student's default
    assert list(out.glob("logs/**/events.out.tfevents.*"))  # 'all' = every installed tracker (TensorBoard here)


def test_learning_rate_default_follows_the_student_kind(prompts_file):
    from diffusers_onestep.training_utils import (
        LORA_LEARNING_RATE,
        STUDENT_LEARNING_RATE,
        TrainingArguments,
        parse_args,
        validate_training_args,
    )

    def resolved(*flags):
        (args,) = parse_args((TrainingArguments,), ["--pretrained_model_name_or_path=org/t", f"--train_prompts={prompts_file}", *flags])
        validate_training_args(args)
        return args

    assert resolved().learning_rate == STUDENT_LEARNING_RATE == 1e-6
    assert resolved("--student_lora_rank=8").learning_rate == LORA_LEARNING_RATE == 1e-4
    assert resolved("--student_lora_rank=8", "--learning_rate=3e-5").learning_rate == 3e-5
    # an explicit epoch count beats a preset's step count; an explicit step count beats both
    presets = {"p": {"max_train_steps": 40_000}}
    (args,) = parse_args((TrainingArguments,), ["--preset=p", "--num_train_epochs=2"], presets=presets)
    assert args.max_train_steps is None
    (args,) = parse_args((TrainingArguments,), ["--preset=p", "--num_train_epochs=2", "--max_train_steps=7"], presets=presets)
    assert args.max_train_steps == 7


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("student_lora_rank", [0, 4])
def test_two_cpu_ranks_match_single_process(script, tiny_teacher_dir, prompts_file, tmp_path, student_lora_rank):
    common = ["--max_train_steps=3", f"--student_lora_rank={student_lora_rank}", "--gradient_accumulation_steps=2"]
    single = _argv(tiny_teacher_dir, prompts_file, tmp_path / "single", *common)
    script.main(single)  # one process, global batch 2
    ddp = _argv(tiny_teacher_dir, prompts_file, tmp_path / "ddp", *common)
    ddp = [a.replace("--train_batch_size=2", "--train_batch_size=1") for a in ddp]  # two ranks x 1
    # `accelerate launch` through this interpreter (the CLI need not be on PATH)
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
    ]
    launch += ["--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={_free_port()}"]
    env = {**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run([*launch, str(SCRIPT), *ddp], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "Num processes: 2" in result.stderr + result.stdout

    # Same randomness and data by construction; what differs is float rounding (batch 1 vs 2 per UNet call, the
    # all-reduce), which Adam amplifies where e_teacher - e_fake cancels. The distance between the runs must be
    # tiny next to the distance each run moved (a wrong reduction or per-rank randomness would be of the same order).
    if student_lora_rank:
        expected = load_file(tmp_path / "single" / "pytorch_lora_weights.safetensors")
        actual = load_file(tmp_path / "ddp" / "pytorch_lora_weights.safetensors")
        initial = {k: torch.zeros_like(v) for k, v in expected.items() if "lora_B" in k}  # B starts at zero
    else:
        expected = load_file(tmp_path / "single" / "unet" / "diffusion_pytorch_model.safetensors")
        actual = load_file(tmp_path / "ddp" / "unet" / "diffusion_pytorch_model.safetensors")
        initial = load_file(Path(tiny_teacher_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    assert expected.keys() == actual.keys()
    gap = sum(((actual[k] - expected[k]) ** 2).sum() for k in initial) ** 0.5
    moved = sum(((expected[k] - initial[k]) ** 2).sum() for k in initial) ** 0.5
    assert moved > 0 and gap < 1e-2 * moved, (gap, moved)
