"""End-to-end tests of training/train_pg_swiftbrush.py: `main([...])` in-process against a tiny teacher directory."""

import importlib.util
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


def test_push_to_hub_uploads_the_output_dir(script, tiny_teacher_dir, prompts_file, tmp_path, monkeypatch, capfd):
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
    argv = _argv(tiny_teacher_dir, prompts_file, out, "--max_train_steps=1", "--push_to_hub")
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
    assert "hf_SECRET123" not in captured.out + captured.err


def test_bad_arguments_fail_before_any_work(script, tiny_teacher_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit):
        script.main(_argv(tiny_teacher_dir, prompts_file, out, "--mixed_precision=fp8"))
    assert "--mixed_precision" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--student_lora_rank"):
        script.main(_argv(tiny_teacher_dir, prompts_file, out, "--student_lora_rank=-1"))
    with pytest.raises(ValueError, match="guidance_scale_range"):
        script.main(_argv(tiny_teacher_dir, prompts_file, out, "--guidance_scale_min=5"))
    with pytest.raises(ValueError, match="--pretrained_teacher_model_name_or_path"):
        script.main(_argv("", prompts_file, out))
    with pytest.raises(SystemExit):
        script.main(_argv(tiny_teacher_dir, prompts_file, out, "--preset=sd99-nothing"))
    assert "sd15-pgsb" in capsys.readouterr().err
    assert not out.exists()


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
