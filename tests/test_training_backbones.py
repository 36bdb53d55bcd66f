"""Training on every backbone (issue 10 item 5): PG-SB runs of a few steps on tiny SDXL and PixArt teachers saved as real
`StableDiffusionXLPipeline` / `PixArtAlphaPipeline` directories, full and LoRA students whose outputs load with the
right pipeline class and generate; the teacher's own prompt encoding; adapters on the PixArt transformer; the
unsupported-teacher errors."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, PixArtAlphaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from diffusers_onestep import ConsistencyStudentScheduler, OneStepPipeline, OneStepPixArtPipeline, OneStepXLPipeline
from diffusers_onestep.losses import Denoiser
from diffusers_onestep.models.backbones import expand_conditioning
from diffusers_onestep.testing_utils import get_dummy_pixart_components, get_dummy_sdxl_components
from diffusers_onestep.training_utils import (
    FAKE_SCORE_ADAPTER,
    STUDENT_ADAPTER,
    TEACHER_PIPELINES,
    AdapterView,
    TrainingArgumentError,
    build_distillation_unets,
    encode_prompts,
    load_teacher,
    teacher_latent_shape,
)


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "train_pg_swiftbrush.py"
PROMPTS = ["a photo of a cat", "a photo of a dog", "the digit seven", "a pet"]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STUDENT_CLASSES = {"sdxl": OneStepXLPipeline, "pixart": OneStepPixArtPipeline}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_pg_swiftbrush", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory):
    """Tiny SDXL and PixArt-α teachers saved as real diffusers pipeline directories."""
    dirs = {}
    for name, pipe in (
        ("sdxl", StableDiffusionXLPipeline(**get_dummy_sdxl_components())),
        ("pixart", PixArtAlphaPipeline(**get_dummy_pixart_components())),
    ):
        dirs[name] = str(tmp_path_factory.mktemp(f"tiny-{name}-teacher"))
        pipe.save_pretrained(dirs[name], safe_serialization=True)
    return dirs


def _argv(teacher, prompts, output_dir, *extra):
    return [
        f"--pretrained_teacher_model_name_or_path={teacher}", f"--train_prompts={prompts}", f"--output_dir={output_dir}",
        "--train_batch_size=2", "--seed=0", "--fake_score_lora_rank=4", "--fake_score_lora_alpha=8",
        "--learning_rate=1e-3", "--report_to=none", "--mixed_precision=no", *extra,
    ]  # fmt: skip


def _sample(pipe, seed=0):
    kwargs = {"use_resolution_binning": False} if isinstance(pipe, OneStepPixArtPipeline) else {}
    return pipe("a photo of a cat", generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).images


# ---------------------------------------------------------------- PG-SB runs: full and LoRA students, SDXL and PixArt


@pytest.mark.parametrize("backbone", ["sdxl", "pixart"])
def test_full_student_trains_and_loads_with_its_pipeline_class(backbone, script, teacher_dirs, prompts_file, tmp_path):
    out = tmp_path / "full"
    argv = _argv(teacher_dirs[backbone], prompts_file, out, "--max_train_steps=2", "--gradient_checkpointing")
    argv += ["--validation_prompts", "a pet", "--validation_steps=2", "--num_validation_images=1"]
    trained = script.main(argv)
    cls = STUDENT_CLASSES[backbone]
    assert type(trained) is cls

    # the directory is the backbone's student pipeline: it loads through our class and through diffusers
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == cls.__name__
    reloaded = cls.from_pretrained(out)
    assert isinstance(DiffusionPipeline.from_pretrained(out), cls)
    assert isinstance(reloaded.scheduler, ConsistencyStudentScheduler) and reloaded.scheduler.config.t_init == 999
    reloaded.set_progress_bar_config(disable=True)
    image = _sample(reloaded)
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()
    torch.testing.assert_close(image, _sample(trained))
    # training moved the student away from the teacher
    network = cls.backbone.network_attribute
    teacher = DiffusionPipeline.from_pretrained(teacher_dirs[backbone])
    assert any(
        not torch.equal(a, b)
        for a, b in zip(getattr(teacher, network).parameters(), getattr(reloaded, network).parameters())
    )
    assert (out / "validation" / "step-000002.png").is_file()
    card = (out / "README.md").read_text()
    assert f"{cls.__name__}.from_pretrained" in card and "OneStepPipeline." not in card


@pytest.mark.parametrize("backbone", ["sdxl", "pixart"])
def test_lora_student_shares_the_frozen_base_and_reloads_with_from_teacher(
    backbone, script, teacher_dirs, prompts_file, tmp_path
):
    out = tmp_path / "lora"
    argv = _argv(teacher_dirs[backbone], prompts_file, out, "--max_train_steps=2", "--student_lora_rank=4")
    argv += ["--student_lora_alpha=16", "--learning_rate=3e-2"]
    trained = script.main(argv)
    cls = STUDENT_CLASSES[backbone]
    assert type(trained) is cls

    # one network: the frozen base with the student and fake-score adapters (the shared-frozen-base memory mode)
    network = getattr(trained, cls.backbone.network_attribute)
    assert set(network.peft_config) == {STUDENT_ADAPTER, FAKE_SCORE_ADAPTER}
    assert sorted(os.listdir(out)) == ["README.md", "pytorch_lora_weights.safetensors", "scheduler"]
    reloaded = cls.from_teacher(teacher_dirs[backbone], lora=str(out))
    reloaded.set_progress_bar_config(disable=True)
    (adapter,) = getattr(reloaded, cls.backbone.network_attribute).peft_config.values()
    assert (adapter.r, adapter.lora_alpha) == (4, 16)
    assert reloaded.scheduler.config.t_init == 999
    torch.testing.assert_close(_sample(reloaded), _sample(trained), rtol=1e-4, atol=1e-5)
    # the adapter was trained (lora_B starts at zero): the student differs from the bare teacher network
    bare = cls.from_teacher(teacher_dirs[backbone], lora=str(out))
    bare.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for name, param in getattr(bare, cls.backbone.network_attribute).named_parameters():
            if "lora_B" in name:
                param.zero_()
    assert (_sample(bare) - _sample(reloaded)).abs().max() > 1e-5
    card = (out / "README.md").read_text()
    assert f"{cls.__name__}.from_teacher" in card


# ---------------------------------------------------------------- the teacher's own prompt encoding


def test_sdxl_conditioning_is_the_teacher_pipelines_own_encoding(teacher_dirs):
    teacher = load_teacher(teacher_dirs["sdxl"])
    pipe = teacher.pipeline
    assert isinstance(pipe, StableDiffusionXLPipeline) and teacher.backbone.name == "sdxl"
    cond = encode_prompts(teacher, ["a photo of a cat", "a pet"], device="cpu")
    uncond = encode_prompts(teacher, [""], device="cpu", unconditional=True)
    embeds, _, pooled, _ = pipe.encode_prompt(["a photo of a cat", "a pet"], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["text_embeds"], pooled)
    # SDXL's time ids for the trained size (16 px), no crop; its unconditional branch is zeros (force_zeros_for_empty_prompt)
    assert cond["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2
    assert uncond["encoder_hidden_states"].abs().max() == 0 and uncond["text_embeds"].abs().max() == 0
    # the teacher denoiser runs on the dict, with CFG batched
    x = torch.randn(2, *teacher_latent_shape(teacher))
    out = Denoiser.from_scheduler(teacher.network, teacher.scheduler)(x, 500, cond, 2.0, expand_conditioning(uncond, 2))
    assert out.x0.shape == x.shape and torch.isfinite(out.eps).all()


def test_pixart_conditioning_is_the_teacher_pipelines_own_encoding(teacher_dirs):
    teacher = load_teacher(teacher_dirs["pixart"])
    pipe = teacher.pipeline
    assert isinstance(pipe, PixArtAlphaPipeline) and teacher.backbone.name == "pixart"
    cond = encode_prompts(teacher, ["a photo of a cat"], device="cpu")
    uncond = encode_prompts(teacher, [""], device="cpu", unconditional=True)
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        "a photo of a cat", do_classifier_free_guidance=True, negative_prompt="", device="cpu"
    )
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["encoder_attention_mask"], mask)
    torch.testing.assert_close(uncond["encoder_hidden_states"], negative)
    torch.testing.assert_close(uncond["encoder_attention_mask"], negative_mask)
    assert cond["resolution"] is None  # a 256/512-class transformer takes no size conditions (as PixArtAlphaPipeline)
    assert teacher_latent_shape(teacher) == (4, 8, 8)
    with pytest.raises(TrainingArgumentError, match=r"multiple of 4 .*patch|multiple of 4"):
        teacher_latent_shape(teacher, 18)


def test_pixart_adapters_switch_and_share_one_frozen_base(teacher_dirs):
    teacher = load_teacher(teacher_dirs["pixart"])
    base = teacher.network
    x = torch.randn(1, 4, 8, 8)
    cond = encode_prompts(teacher, ["a pet"], device="cpu")
    reference = Denoiser.from_scheduler(base, teacher.scheduler)(x, 300, cond).eps
    unets = build_distillation_unets(
        base, student_lora_rank=2, student_lora_alpha=2, fake_score_lora_rank=2, fake_score_lora_alpha=2
    )
    assert unets.shared and unets.student is base
    assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for p in unets.student_parameters + unets.fake_score_parameters)
    with torch.no_grad():
        for name, param in base.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    views = {name: AdapterView(base, name) for name in (None, STUDENT_ADAPTER, FAKE_SCORE_ADAPTER)}
    eps = {name: Denoiser.from_scheduler(view, teacher.scheduler)(x, 300, cond).eps for name, view in views.items()}
    torch.testing.assert_close(eps[None], reference)  # adapters off = the teacher
    assert (eps[STUDENT_ADAPTER] - reference).abs().max() > 1e-4
    assert (eps[FAKE_SCORE_ADAPTER] - eps[STUDENT_ADAPTER]).abs().max() > 1e-4
    # switching kept both adapters trainable
    assert all(p.requires_grad for p in unets.student_parameters + unets.fake_score_parameters)


# ---------------------------------------------------------------- unsupported teachers, named before any work


def _fake_pipeline_dir(path, class_name):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model_index.json"), "w") as file:
        json.dump({"_class_name": class_name, "_diffusers_version": "0.42.1"}, file)
    return str(path)


@pytest.mark.parametrize(
    "class_name", ["StableDiffusion3Pipeline", "FluxPipeline", "KandinskyV22Pipeline", "OneStepPipeline"]
)
def test_unsupported_teacher_is_named_with_the_supported_ones(class_name, script, prompts_file, tmp_path):
    teacher = _fake_pipeline_dir(tmp_path / "teacher", class_name)
    out = tmp_path / "out"
    with pytest.raises(TrainingArgumentError) as error:
        script.main(_argv(teacher, prompts_file, out, "--max_train_steps=1"))
    message = str(error.value)
    assert class_name in message and "--pretrained_teacher_model_name_or_path" in message
    assert all(name in message for name in TEACHER_PIPELINES)
    assert not out.exists()  # refused before any work
    # load_teacher refuses it too, before loading anything (the directory has no weights to load)
    with pytest.raises(TrainingArgumentError, match=class_name):
        load_teacher(teacher)


def test_supported_teacher_classes():
    assert TEACHER_PIPELINES == {
        "StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "PixArtAlphaPipeline": "pixart",
        "PixArtSigmaPipeline": "pixart",
    }  # fmt: skip


def test_sd_teacher_keeps_its_components(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    assert isinstance(teacher.pipeline, StableDiffusionPipeline) and teacher.unet is teacher.network
    assert teacher.backbone.student_pipeline is OneStepPipeline
    assert not any(p.requires_grad for p in teacher.network.parameters())
    assert teacher.text_encoder is teacher.pipeline.text_encoder and teacher.vae is teacher.pipeline.vae


# ---------------------------------------------------------------- real `accelerate launch` on two CPU ranks (slow)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_pixart_lora_student_under_accelerate_launch_on_two_cpu_ranks(teacher_dirs, prompts_file, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
        "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={_free_port()}", str(SCRIPT),
        *_argv(teacher_dirs["pixart"], prompts_file, out, "--max_train_steps=2", "--student_lora_rank=4"),
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env={**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = OneStepPixArtPipeline.from_teacher(teacher_dirs["pixart"], lora=str(out))
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(_sample(pipe)).all()


_FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_auto_wrap_policy: NO_WRAP
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_use_orig_params: true
  fsdp_sync_module_states: false
  fsdp_cpu_ram_efficient_loading: false
  fsdp_offload_params: false
  fsdp_version: 1
machine_rank: 0
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: {use_cpu}
"""


@pytest.mark.slow
@pytest.mark.parametrize("use_cpu", [True, False], ids=["cpu-ranks", "no-process-group"])
def test_fsdp_config_on_two_cpu_ranks(use_cpu, teacher_dirs, prompts_file, tmp_path):
    """accelerate enables FSDP only on accelerators: on CPU ranks the FSDP config runs as DDP over gloo (and says so);
    without `use_cpu` the two processes would share no process group, which the script refuses."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(_FSDP_CONFIG.format(use_cpu=str(use_cpu).lower()))
    out = tmp_path / "fsdp"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", f"--config_file={config}",
        f"--main_process_port={_free_port()}", str(SCRIPT),
        *_argv(teacher_dirs["sdxl"], prompts_file, out, "--max_train_steps=2"),
    ]  # fmt: skip
    env = {**SUBPROCESS_ENV, **({"ACCELERATE_USE_CPU": "1"} if use_cpu else {})}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    if use_cpu:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "The FSDP config was ignored" in result.stderr and "MULTI_CPU" in result.stderr
        pipe = OneStepXLPipeline.from_pretrained(out)
        pipe.set_progress_bar_config(disable=True)
        assert torch.isfinite(_sample(pipe)).all()
    else:
        assert result.returncode != 0
        assert "set up no process group" in result.stderr and not (out / "model_index.json").exists()


def test_backbone_presets(script, teacher_dirs, prompts_file, tmp_path):
    from diffusers_onestep.training_utils import PRESETS, TrainingArguments, parse_args

    assert PRESETS["sdxl-pgsb"]["pretrained_teacher_model_name_or_path"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert PRESETS["pixart-pgsb"]["pretrained_teacher_model_name_or_path"] == "PixArt-alpha/PixArt-XL-2-512x512"
    argv = ["--preset=pixart-pgsb", f"--pretrained_teacher_model_name_or_path={teacher_dirs['pixart']}"]
    argv += [f"--train_prompts={prompts_file}", f"--output_dir={tmp_path}"]
    args, pg = parse_args((TrainingArguments, script.PGSwiftBrushArguments), argv)
    assert (pg.guidance_scale_min, pg.guidance_scale_max) == (0.5, 3.0)  # SNOOPI's PixArt range
    assert args.pretrained_teacher_model_name_or_path == teacher_dirs["pixart"]  # an explicit flag wins


@pytest.mark.parametrize("backbone", ["sdxl", "pixart"])
def test_teacher_is_frozen_in_the_training_dtype(backbone, teacher_dirs):
    teacher = load_teacher(teacher_dirs[backbone], dtype=torch.bfloat16)
    assert teacher.vae.dtype == torch.bfloat16 and teacher.text_encoder.dtype == torch.bfloat16
    assert teacher.network.dtype == torch.float32  # a full student copies exact weights; the frozen base is cast later
    modules = [m for m in teacher.pipeline.components.values() if isinstance(m, torch.nn.Module)]
    assert not any(p.requires_grad for m in modules for p in m.parameters())
    cond = encode_prompts(teacher, ["a pet"], device="cpu", dtype=torch.bfloat16)
    assert cond["encoder_hidden_states"].dtype == torch.bfloat16
