import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from diffusers_onestep.pipelines.oracles import CallableOracle, CLIPScoreOracle, ImageRewardOracle, Oracle
from diffusers_onestep.testing_utils import build_clip_tokenizer


PROMPTS = ["a photo of a cat", "a photo of a dog", "the digit seven", "a pet", "a cat"]


@pytest.fixture
def images():
    return torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def tiny_clip(image_size=16):
    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    text = {**sizes, "vocab_size": 1100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1}
    vision = {**sizes, "image_size": image_size, "patch_size": 4}
    model = CLIPModel(CLIPConfig(text_config={**text, "pad_token_id": 1}, vision_config=vision, projection_dim=16))
    model.eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size)
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer())


def hand_clip_score(model, processor, images, prompts):
    """100 * cos(image, text) with the processor's resize / crop / normalisation written out."""
    pixels = F.interpolate(images, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    text = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        text_embeds = model.get_text_features(**text).pooler_output
        image_embeds = model.get_image_features(pixel_values=(pixels.clamp(0, 1) - mean) / std).pooler_output
    return 100 * F.cosine_similarity(image_embeds, text_embeds, dim=-1)


def test_callable_oracle_batches_under_no_grad(images):
    seen = []

    def brightness(chunk, prompts):
        seen.append((chunk.shape[0], list(prompts), torch.is_grad_enabled()))
        return chunk.mean(dim=(1, 2, 3)).tolist()  # a list is accepted too

    oracle = CallableOracle(brightness, batch_size=2)
    assert isinstance(oracle, Oracle)
    scores = oracle(images, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    torch.testing.assert_close(scores, images.mean(dim=(1, 2, 3)))
    assert [s[0] for s in seen] == [2, 2, 1] and [p for s in seen for p in s[1]] == PROMPTS
    assert not any(s[2] for s in seen)


def test_callable_oracle_errors(images):
    with pytest.raises(ValueError, match="one score per image"):
        CallableOracle(lambda x, p: torch.zeros(3))(images, PROMPTS)
    with pytest.raises(ValueError, match="`prompts` must be 5 strings"):
        CallableOracle(lambda x, p: torch.zeros(5))(images, PROMPTS[:2])
    with pytest.raises(ValueError, match=r"\(batch, 1 or 3, H, W\)"):
        CallableOracle(lambda x, p: torch.zeros(5))(images[:, 0], PROMPTS)
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1"):
        CallableOracle(lambda x, p: x, batch_size=0)
    with pytest.raises(ValueError, match="`fn` must be callable"):
        CallableOracle("not a function")


def test_clip_score_oracle_matches_hand_computation_and_batches(images):
    model, processor = tiny_clip()
    expected = hand_clip_score(model, processor, images, PROMPTS)
    scores = CLIPScoreOracle(model, processor, batch_size=2)(images, PROMPTS)
    assert scores.shape == (5,) and scores.dtype == torch.float32 and not scores.requires_grad
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)
    # other image sizes are resized as the processor says (shortest edge, then center crop)
    wide = CLIPScoreOracle(model, processor)(torch.rand(2, 3, 24, 40), PROMPTS[:2])
    assert wide.shape == (2,) and torch.isfinite(wide).all()
    # grayscale images (one-channel VAEs) score as their three-channel repeat
    gray = images[:, :1]
    torch.testing.assert_close(
        CLIPScoreOracle(model, processor)(gray, PROMPTS),
        CLIPScoreOracle(model, processor)(gray.repeat(1, 3, 1, 1), PROMPTS),
    )


def test_clip_score_oracle_from_pretrained(tmp_path, images):
    model, processor = tiny_clip()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    oracle = CLIPScoreOracle.from_pretrained(tmp_path, batch_size=3)
    torch.testing.assert_close(oracle(images, PROMPTS), CLIPScoreOracle(model, processor)(images, PROMPTS))


def test_image_reward_oracle_needs_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install image-reward"):
        ImageRewardOracle.from_pretrained()


def test_image_reward_oracle_groups_by_prompt_and_keeps_order(monkeypatch, images):
    calls = []

    class FakeImageReward(torch.nn.Module):
        def score(self, prompt, pil_images):
            calls.append((prompt, len(pil_images)))
            values = [float(np.asarray(im).mean()) + len(prompt) for im in pil_images]
            return values if len(values) > 1 else values[0]  # ImageReward returns a float for one image

    fake = types.ModuleType("ImageReward")
    fake.load = lambda name, device, download_root: FakeImageReward()
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    prompts = ["a cat", "a dog", "a cat", "a pet", "a dog"]
    scores = ImageRewardOracle.from_pretrained(device="cpu")(images, prompts)
    pixels = (images.permute(0, 2, 3, 1) * 255).round().mean(dim=(1, 2, 3))
    torch.testing.assert_close(scores, pixels + torch.tensor([len(p) for p in prompts]).float(), atol=1e-3, rtol=0)
    assert calls == [("a cat", 2), ("a dog", 2), ("a pet", 1)]
