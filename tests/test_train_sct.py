"""training/train_sct.py (ECT / SCT consistency tuning) and its image-caption data layer: both methods save a
two-step consistency student, the LoRA student, `--dataset_name`, SCT's same-caption references, bad input.
Kill / resume, NaN, Hub and token faults: the shared table (tests/training_scripts.py)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from training_scripts import SCRIPTS, load_script, tiny_imagefolder

import diffusers_onestep.losses.consistency as consistency
from diffusers_onestep import OneStepPipeline
from diffusers_onestep.training_utils import ImageCaptionDataset, TrainingArgumentError, encode_images


CASE = next(c for c in SCRIPTS if c.name == "train_sct" and c.backbone == "sd")
PROMPTS = ["a photo of a cat", "a photo of a dog", "the digit seven"]


@pytest.fixture(scope="module")
def script():
    return load_script(CASE)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def _argv(teacher, prompts, out, *flags):
    # CASE.flags are SCT's; these tests pick the method themselves
    return [a for a in CASE.argv(teacher, prompts, out) if a not in CASE.flags] + list(flags)


@pytest.mark.parametrize("method", ["ect", "sct"])
def test_saved_student_is_a_two_step_consistency_pipeline(script, tiny_teacher_dir, prompts_file, tmp_path, method):
    out = tmp_path / method
    extra = ["--stf_reference_size=3"] if method == "sct" else []
    returned = script.main(_argv(tiny_teacher_dir, prompts_file, out, f"--method={method}", "--max_train_steps=2",
                                 "--checkpointing_steps=2", "--use_ema", "--mid_sigma=0.821", "--dropout=0.3", *extra,
                                 "--validation_prompts", PROMPTS[0]))  # fmt: skip
    # trained with dropout on the residual blocks; validated and returned in eval mode
    assert not returned.unet.training and {m.dropout.p for m in returned.unet.modules() if hasattr(m, "conv1")} == {0.3}
    assert (out / "validation" / "step-000002.png").is_file()
    pipe = OneStepPipeline.from_pretrained(out)
    config = pipe.scheduler.config
    expected_mid = int(consistency.sigma_to_timestep(pipe.scheduler.alphas_cumprod, torch.tensor([0.821])).round())
    assert (config.t_init, config.input_type, config.mid_timestep) == (999, "noise", expected_mid)
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == [999, expected_mid]
    image = pipe(PROMPTS[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.isfinite(image.images).all()
    card = (out / "README.md").read_text()
    assert method.upper() in card and "arXiv 2406.14548" in card and ("2410.18958" in card) == (method == "sct")
    # the checkpoint holds the student, its optimizer and the EMA; there is no fake score
    files = sorted(os.listdir(out / "checkpoint-2"))
    assert "ema.safetensors" in files and "optimizer.bin" in files and "trainable_1.safetensors" not in files


def test_lora_student_trains_only_its_adapter(script, tiny_teacher_dir, prompts_file, tmp_path):
    out = tmp_path / "lora"
    script.main(_argv(tiny_teacher_dir, prompts_file, out, "--method=ect", "--student_lora_rank=4",
                      "--max_train_steps=2", "--checkpointing_steps=2"))  # fmt: skip
    from safetensors.torch import load_file

    state = load_file(out / "checkpoint-2" / "trainable_0.safetensors")
    assert state and all("lora" in name and "student" in name for name in state)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    pipe = OneStepPipeline.from_teacher(tiny_teacher_dir, lora=str(out))
    assert pipe.scheduler.config.mid_timestep is not None
    assert torch.isfinite(pipe(PROMPTS[1], num_inference_steps=2, output_type="pt").images).all()


def test_dataset_name_reads_a_saved_dataset_with_named_columns(script, tiny_teacher_dir, prompts_file, tmp_path):
    import datasets

    folder = tiny_imagefolder(prompts_file)
    table = datasets.load_dataset("imagefolder", data_dir=folder, split="train")
    table = table.rename_columns({"image": "picture", "text": "words"})
    table.save_to_disk(str(tmp_path / "saved"))
    argv = [a for a in _argv(tiny_teacher_dir, prompts_file, tmp_path / "out", "--method=ect", "--max_train_steps=1")
            if not a.startswith("--train_data_dir")]  # fmt: skip
    argv += [f"--dataset_name={tmp_path / 'saved'}", "--image_column=picture", "--caption_column=words"]
    assert isinstance(script.main(argv), OneStepPipeline)
    with pytest.raises(TrainingArgumentError, match="`--image_column` 'image' is not in .*'picture'"):
        script.main([a for a in argv if not a.startswith("--image_column")])


@pytest.mark.parametrize(
    "flags, match",
    [(["--method=ect", "--stf_reference_size=4"], "--stf_reference_size"), (["--sigma_data=0.5"], "--sigma_data"),
     (["--method=consistency"], "--method"), (["--optimizer=sgd"], "--optimizer"), (["--P_std=0"], "--P_std"),
     (["--dropout=1"], "--dropout"), (["--q=1"], "--q"), (["--mid_sigma=-1"], "--mid_sigma"),
     (["--optimizer=radam", "--use_8bit_adam"], "--use_8bit_adam"), (["--caption_column=nope"], "--caption_column"),
     (["--double_every=0"], "--double_every")],
)  # fmt: skip
def test_bad_flags_are_refused_before_any_work(
    script, tiny_teacher_dir, prompts_file, tmp_path, flags, match, capsys, monkeypatch
):
    loaded = []
    monkeypatch.setattr(script.Distillation, "setup", lambda *a, **k: loaded.append(1))
    with pytest.raises((ValueError, SystemExit)) as error:
        script.main(_argv(tiny_teacher_dir, prompts_file, tmp_path / "out", *flags))
    message = capsys.readouterr().err if error.type is SystemExit else str(error.value)  # argparse prints, exits
    assert match in message, message
    assert not loaded and not (tmp_path / "out").exists()


def test_prompt_files_are_refused(script, tiny_teacher_dir, prompts_file, tmp_path):
    argv = [a for a in _argv(tiny_teacher_dir, prompts_file, tmp_path / "out") if not a.startswith("--train_data_dir")]
    with pytest.raises(TrainingArgumentError, match="trains on images.*--train_data_dir"):
        script.main([*argv, f"--train_prompts={prompts_file}"])


def _gray_folder(tmp_path) -> str:
    folder = tmp_path / "gray"
    folder.mkdir()
    rows = []
    for i, caption in enumerate(["seven", "seven", "three", "seven"]):
        pixels = np.full((6, 12), 40 * i, dtype=np.uint8)
        pixels[:, :2] = 255  # a bright left edge (cropped away at resolution 4)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": caption})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_image_caption_dataset_pixels_groups_references_and_flips(tmp_path):
    import datasets

    table = datasets.load_dataset("imagefolder", data_dir=_gray_folder(tmp_path), split="train")
    data = ImageCaptionDataset(table, resolution=4, channels=1, random_flip=True)
    assert data.captions == ["seven", "seven", "three", "seven"] and data.indices == [0, 1, 2, 3]
    pixels = data.pixels([0, 3])
    # 6x12 -> shorter side 4 (4x8), centre crop 4x4: columns 2..5 of the resized image, no bright edge left
    assert pixels.shape == (2, 1, 4, 4) and pixels.min() >= -1 and pixels.max() <= 1
    torch.testing.assert_close(pixels[0], torch.full((1, 4, 4), -1.0))
    torch.testing.assert_close(pixels[1], torch.full((1, 4, 4), 120 / 127.5 - 1))
    wide = ImageCaptionDataset(table, resolution=6, channels=3)  # RGB, resolution = the shorter side: no crop
    flipped = wide.pixels([0], torch.tensor([True]))
    assert flipped.shape == (1, 3, 6, 6)
    torch.testing.assert_close(flipped, wide.pixels([0]).flip(-1))
    # references come from the sample's own caption group only, reproducibly
    refs = data.references([2, 0], 5, torch.Generator().manual_seed(0))
    assert refs[0].tolist() == [2] * 5 and set(refs[1].tolist()) <= {0, 1, 3}
    assert torch.equal(refs, data.references([2, 0], 5, torch.Generator().manual_seed(0)))
    assert data.group_ids.tolist() == [0, 0, 1, 0]
    # flips are drawn whether or not --random_flip is set (same random stream), and all False without it
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert data.flips(8, g1).any() and not wide.flips(8, g2).any()
    assert torch.equal(torch.rand(1, generator=g1), torch.rand(1, generator=g2))


def test_encode_images_samples_the_posterior_with_the_given_noise():
    from diffusers_onestep.testing_utils import get_dummy_components

    vae = get_dummy_components()["vae"]
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = vae.encode(pixels).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))
    expected = (posterior.mean + posterior.std * noise) * vae.config.scaling_factor
    torch.testing.assert_close(encode_images(vae, pixels, noise, torch.float32), expected)


def test_set_dropout_sets_the_residual_blocks(script):
    from diffusers_onestep.testing_utils import get_dummy_components

    unet = get_dummy_components()["unet"]
    resnets = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    assert script.set_dropout(unet, 0.2) == len(resnets) > 0
    assert all(m.dropout.p == 0.2 for m in resnets)
    attention_dropouts = [m for m in unet.modules() if isinstance(m, torch.nn.Dropout) and m.p != 0.2]
    assert attention_dropouts  # attention / feed-forward dropouts are left alone (ECT: residual blocks only)


def test_presets_follow_ects_recipe(script, prompts_file, tmp_path):
    from diffusers_onestep.training_utils import TrainingArguments, parse_args

    common = [f"--output_dir={tmp_path / 'out'}", f"--train_data_dir={tmp_path}"]
    for preset in ("sd15-ect", "sd15-sct", "sdxl-sct", "pixart-ect"):
        args, ct = parse_args((TrainingArguments, script.SCTArguments), [f"--preset={preset}", *common])
        assert (args.optimizer, args.learning_rate, args.adam_weight_decay, ct.dropout) == ("radam", 1e-4, 0.0, 0.2)
        assert args.train_batch_size * args.gradient_accumulation_steps == 128 and args.ema_decay == 0.9999
        assert ct.method == preset.split("-")[1] and (args.t_init, args.input_type) == (999, "noise")
    with pytest.raises(ValueError, match="does not define"):  # a SiD preset names flags consistency tuning lacks
        parse_args((TrainingArguments, script.SCTArguments), ["--preset=sd15-sid-lsg", *common])


def test_list_captions_are_refused_with_the_column_named():
    import datasets

    table = datasets.Dataset.from_dict({"image": [Image.new("RGB", (4, 4))], "text": [["a cat", "a kitten"]]})
    with pytest.raises(TrainingArgumentError, match="`--caption_column` 'text'.*lists of captions"):
        ImageCaptionDataset(table, resolution=4)


def test_cpu_time_budget_stops_early_with_a_checkpoint_and_the_final_save(script, tiny_teacher_dir, prompts_file,
                                                                         tmp_path):  # fmt: skip
    out = tmp_path / "budget"
    script.main(_argv(tiny_teacher_dir, prompts_file, out, "--method=ect", "--max_train_steps=50",
                      "--checkpointing_steps=50", "--max_train_minutes=1e-6", "--train_clock=cpu"))  # fmt: skip
    # the budget is spent after the first step: checkpoint-1 (off the cadence) and the usual final save
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-1"]
    manifest = json.loads((out / "checkpoint-1" / "checkpoint.json").read_text())
    assert manifest["train_clock"] == "cpu" and manifest["train_minutes"] > 0
    assert OneStepPipeline.from_pretrained(out).scheduler.config.t_init == 999
    assert "| max_train_steps | 1 |" in (out / "README.md").read_text()  # the steps trained, not the 50 asked
