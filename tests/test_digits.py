"""The digits example (examples/digits/): data preparation, judge, VAE, teacher and evaluation on tiny sizes."""

import os
import sys
from collections import Counter

import pytest
import torch


DIGITS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "digits")
sys.path.insert(0, DIGITS_DIR)

import digits_data  # noqa: E402


def test_split_is_fixed_stratified_and_disjoint():
    split = digits_data.split_indices()
    assert len(split["train"]) == 1500 and len(split["test"]) == 297
    assert not set(split["train"]) & set(split["test"])
    assert (split["train"] == digits_data.split_indices()["train"]).all()
    images, labels = digits_data.load_digits_split("test")
    assert images.shape == (297, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() >= 28 and counts.max() <= 31


def test_captions():
    assert digits_data.digit_prompt(7) == "a handwritten digit seven"
    assert [digits_data.caption_for_label(7, i) for i in range(3)] == [
        "a handwritten digit seven",
        "the number 7",
        "7",
    ]
    labels = torch.arange(10).repeat(100)
    captions = digits_data.random_captions(labels, torch.Generator().manual_seed(0))
    generic = sum(c == digits_data.GENERIC_CAPTION for c in captions) / len(captions)
    assert 0.15 < generic < 0.25
    assert all(
        c == digits_data.GENERIC_CAPTION or digits_data.DIGIT_WORDS[digit] in c or str(digit) in c
        for c, digit in zip(captions, labels.tolist())
    )


def test_tokenizer_words_are_single_tokens():
    from diffusers_onestep.testing_utils import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(digits_data.TOKENIZER_WORDS)
    ids = tokenizer("a photo of the digit seven", add_special_tokens=False).input_ids
    assert len(ids) == 6
    assert len(tokenizer("7", add_special_tokens=False).input_ids) == 1


def test_prepare_data_writes_a_loadable_imagefolder(tmp_path):
    import datasets
    import prepare_data

    prepare_data.main(["--output_dir", str(tmp_path / "data")])
    dataset = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert dataset["train"].num_rows == 1500 and dataset["test"].num_rows == 297
    train = dataset["train"]
    example = train[0]
    assert example["image"].size == (8, 8) and example["image"].mode == "L"
    # the PNGs are the tensors of `load_digits_split`, up to 8-bit rounding
    images, labels = digits_data.load_digits_split("train")
    pixels = torch.tensor(list(example["image"].getdata()), dtype=torch.float32).view(1, 8, 8) / 255 * 2 - 1
    assert example["label"] == labels[0]
    assert (pixels - images[0]).abs().max() <= 1 / 255 + 1e-6  # half an 8-bit level, in [-1, 1] units
    # balanced captions: 20% generic and every template for every digit
    for label in range(10):
        captions = Counter(t for t, d in zip(train["text"], train["label"]) if d == label)
        total = sum(captions.values())
        assert captions[digits_data.GENERIC_CAPTION] == round(0.2 * total)
        template_counts = [captions[digits_data.caption_for_label(label, i)] for i in range(5)]
        assert max(template_counts) - min(template_counts) <= 1


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    """Judge (1 epoch), VAE (2 steps) and teacher (2 steps) trained through their scripts' `main` on tiny sizes."""
    import judge
    import train_teacher
    import train_vae

    root = tmp_path_factory.mktemp("digits")
    paths = {name: str(root / name) for name in ("judge", "vae", "teacher")}
    judge.main(["--output_dir", paths["judge"], "--epochs", "1"])
    train_vae.main(
        ["--output_dir", paths["vae"], "--judge_dir", paths["judge"], "--max_train_steps", "2", "--channels", "8",
         "--train_batch_size", "16"]
    )  # fmt: skip
    train_teacher.main(
        ["--output_dir", paths["teacher"], "--vae_dir", paths["vae"], "--max_train_steps", "2",
         "--train_batch_size", "8", "--block_out_channels", "16", "32", "--log_every", "1"]
    )  # fmt: skip
    return paths


def test_judge_round_trip_and_inputs(tiny_digits):
    import evaluate

    model = evaluate.load_judge(tiny_digits["judge"])
    images = torch.rand(5, 3, 16, 16)
    features, logits = evaluate.judge_features_and_logits(images)
    assert features.shape == (5, 128) and logits.shape == (5, 10)
    # grayscale 8x8 in [-1, 1] gives the same answer as the equivalent [0, 1] RGB image
    gray = torch.rand(5, 1, 8, 8)
    a, _ = evaluate.judge_features_and_logits(gray.expand(-1, 3, -1, -1), model)
    b, _ = evaluate.judge_features_and_logits(gray * 2 - 1, model, value_range=(-1, 1))
    torch.testing.assert_close(a, b)


def test_real_images_score_well_against_themselves(tiny_digits):
    import evaluate

    evaluate.load_judge(tiny_digits["judge"])
    images, labels = digits_data.load_digits_split("train")
    metrics = evaluate.score_images(images, labels, value_range=(-1, 1))
    assert metrics["fid"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["precision"] == metrics["recall"] == 1.0
    assert metrics["n"] == 1500


def test_teacher_loads_as_stable_diffusion_and_evaluates(tiny_digits):
    import evaluate
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_digits["teacher"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 1 and pipe.vae.config.in_channels == 1
    image = pipe("a handwritten digit seven", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (8, 8) and image.mode == "L"

    def pipe_callable(prompts, generator):
        return pipe(prompts, num_inference_steps=2, guidance_scale=2.0, generator=generator, output_type="pt").images

    evaluate.load_judge(tiny_digits["judge"])
    metrics = evaluate.evaluate_pipeline(pipe_callable, digits_data.digit_prompts(), n_per_prompt=2, batch_size=8)
    assert metrics["n"] == 20 and metrics["fid"] > 0
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1


def test_dit_teacher_trains_saves_as_pixart_and_samples(tiny_digits, tmp_path):
    import evaluate
    import train_teacher
    from diffusers import PixArtAlphaPipeline

    train_teacher.main(
        ["--backbone", "dit", "--output_dir", str(tmp_path / "dit"), "--vae_dir", tiny_digits["vae"],
         "--max_train_steps", "2", "--train_batch_size", "8", "--log_every", "1"]
    )  # fmt: skip
    pipe = PixArtAlphaPipeline.from_pretrained(tmp_path / "dit")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel" and pipe.transformer.config.patch_size == 1
    sample, nfe = evaluate.teacher_sampler(pipe, "dpm++:2", guidance_scale=1.5)
    images = sample(["a handwritten digit seven", "a handwritten digit one"], torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all() and nfe == 4


def test_evaluate_script(tiny_digits, tmp_path):
    import evaluate

    results = evaluate.main(
        ["--teacher_dir", tiny_digits["teacher"], "--judge_dir", tiny_digits["judge"], "--n_per_prompt", "2",
         "--configs", "dpm++:2@1.0", "ddpm:2@2.0", "--output_json", str(tmp_path / "r.json"),
         "--grid_dir", str(tmp_path / "grids")]
    )  # fmt: skip
    assert results["dpm++:2@1.0"]["nfe"] == 2 and results["ddpm:2@2.0"]["nfe"] == 4
    assert results["floor"]["fid_test_vs_train"] > 0
    assert os.path.exists(tmp_path / "r.json") and sorted(os.listdir(tmp_path / "grids"))[:2] == [
        "ddpm_2@2.0.png",
        "ddpm_2@2.0.pt",
    ]


def test_image_grid_pixels_and_labels(tmp_path):
    import evaluate
    import numpy as np
    from PIL import Image

    images = torch.rand(6, 1, 8, 8)
    evaluate.save_image_grid(images, tmp_path / "plain.png", nrow=3, scale=2)
    plain = np.asarray(Image.open(tmp_path / "plain.png"))
    assert plain.shape == (2 * (2 * 9 + 1), 2 * (3 * 9 + 1))
    np.testing.assert_allclose(plain[2:18:2, 2:18:2] / 255, images[0, 0].numpy(), atol=1 / 255)

    evaluate.save_image_grid(images, tmp_path / "labelled.png", nrow=3, scale=2, row_labels=["student", "teacher"],
                             column_labels=["0", "1", "2"])  # fmt: skip
    labelled = np.asarray(Image.open(tmp_path / "labelled.png"))
    top, left = labelled.shape[0] - plain.shape[0], labelled.shape[1] - plain.shape[1]
    assert top > 0 and left > 0
    np.testing.assert_array_equal(labelled[top:, left:], plain)  # the grid itself is untouched
    assert (labelled[top:, :left] < 128).any() and (labelled[:top, left:] < 128).any()  # text in both margins
    with pytest.raises(ValueError, match="row_labels"):
        evaluate.save_image_grid(images, tmp_path / "bad.png", nrow=3, row_labels=["only one"])
