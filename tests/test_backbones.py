"""SDXL and PixArt students on the shared layer (issue 10): hand formula, round trips, LoRA, NASA, bad teachers."""

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    PixArtAlphaPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig, get_peft_model_state_dict

from diffusers_onestep import OneStepPixArtPipeline, OneStepXLPipeline
from diffusers_onestep.attention.nasa import nasa_attention
from diffusers_onestep.models.backbones import BACKBONES, backbone_for
from diffusers_onestep.pipelines.pipeline_utils import decode_latents
from diffusers_onestep.testing_utils import (
    get_dummy_pixart_components,
    get_dummy_sdxl_components,
    get_dummy_teacher_components,
)


TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def sdxl_teacher(seed=0):
    teacher = StableDiffusionXLPipeline(**get_dummy_sdxl_components(seed=seed))
    teacher.set_progress_bar_config(disable=True)
    return teacher


def pixart_teacher(seed=0):
    teacher = PixArtAlphaPipeline(**get_dummy_pixart_components(seed=seed))
    teacher.set_progress_bar_config(disable=True)
    return teacher


def sdxl_student(teacher=None, seed=1):
    pipe = OneStepXLPipeline.from_teacher(teacher or sdxl_teacher(), unet=get_dummy_sdxl_components(seed=seed)["unet"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixart_student(teacher=None, seed=1):
    transformer = get_dummy_pixart_components(seed=seed)["transformer"]
    pipe = OneStepPixArtPipeline.from_teacher(teacher or pixart_teacher(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(pipe, seed=0, **overrides):
    kwargs = {"prompt": "a photo of a cat", "generator": torch.Generator().manual_seed(seed), "output_type": "np"}
    if isinstance(pipe, OneStepPixArtPipeline):
        kwargs["use_resolution_binning"] = False
    return kwargs | overrides


BUILDERS = {"sdxl": sdxl_student, "pixart": pixart_student}


def randomize_lora(network):
    with torch.no_grad():
        for name, param in network.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


# ---------------------------------------------------------------- the one-step output equals the hand formula


@torch.no_grad()
def test_sdxl_one_step_equals_the_hand_formula():
    pipe = sdxl_student()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(**call_kwargs(pipe, latents=z, output_type="pt")).images
    embeds, _, pooled, _ = StableDiffusionXLPipeline.encode_prompt(pipe, "a photo of a cat", do_classifier_free_guidance=False)
    # SDXL's size conditions for a 16x16 image: original (16, 16), crop (0, 0), target (16, 16)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
    eps = pipe.unet(z, 999, encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample  # fmt: skip
    abar = pipe.scheduler.alphas_cumprod[999]
    x0 = (z - (1 - abar).sqrt() * eps) / abar.sqrt()
    expected = (decode_latents(pipe.vae, x0) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_pixart_one_step_equals_the_hand_formula_with_the_learned_sigma_half_dropped():
    pipe = pixart_student()
    assert pipe.transformer.config.out_channels == 8  # learned sigma
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(**call_kwargs(pipe, latents=z, output_type="pt")).images
    embeds, mask, _, _ = PixArtAlphaPipeline.encode_prompt(pipe, "a photo of a cat", do_classifier_free_guidance=False,
                                                           max_sequence_length=120)  # fmt: skip
    output = pipe.transformer(z, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                              timestep=torch.tensor([999]), added_cond_kwargs={"resolution": None,
                                                                                "aspect_ratio": None}).sample
    eps = output[:, :4]
    abar = pipe.scheduler.alphas_cumprod[999]
    x0 = (z - (1 - abar).sqrt() * eps) / abar.sqrt()
    expected = (decode_latents(pipe.vae, x0) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("backbone", ["sdxl", "pixart"])
def test_save_load_round_trips_through_our_class_and_diffusers(backbone, tmp_path):
    pipe = BUILDERS[backbone]()
    expected = pipe(**call_kwargs(pipe, negative_prompt="dog")).images
    pipe.save_pretrained(tmp_path)
    for loader in (type(pipe), DiffusionPipeline):
        loaded = loader.from_pretrained(str(tmp_path))
        assert type(loaded) is type(pipe)
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(loaded(**call_kwargs(loaded, negative_prompt="dog")).images, expected, atol=1e-6)


@pytest.mark.parametrize("backbone", ["sdxl", "pixart"])
def test_from_teacher_directory_equals_from_teacher_object(backbone, tmp_path):
    teacher = sdxl_teacher() if backbone == "sdxl" else pixart_teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    pipe = BUILDERS[backbone](teacher)
    network = pipe.denoiser_network
    network.save_pretrained(tmp_path / "student")
    key = pipe.backbone.network_attribute
    from_dirs = type(pipe).from_teacher(str(tmp_path / "teacher"), **{key: str(tmp_path / "student")})
    from_dirs.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(from_dirs(**call_kwargs(from_dirs)).images, pipe(**call_kwargs(pipe)).images,
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("backbone", ["sdxl", "pixart"])
def test_prompt_embeds_path_equals_prompt_path(backbone):
    pipe = BUILDERS[backbone]()
    expected = pipe(**call_kwargs(pipe)).images
    if backbone == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt("a photo of a cat", do_classifier_free_guidance=False)
        extra = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    else:
        embeds, mask, _, _ = pipe.encode_prompt("a photo of a cat", do_classifier_free_guidance=False)
        extra = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
    np.testing.assert_allclose(pipe(**call_kwargs(pipe, prompt=None, **extra)).images, expected, atol=1e-6)


# ---------------------------------------------------------------- LoRA students


def test_sdxl_lora_through_diffusers_loader_saved_reloaded_and_teacher_untouched(tmp_path):
    teacher = sdxl_teacher()
    before = teacher("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                     output_type="np").images  # fmt: skip
    donor = sdxl_teacher()
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian"))
    randomize_lora(donor.unet)
    OneStepXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(donor.unet),
                                        unet_lora_adapter_metadata=donor.unet.peft_config["default"].to_dict(),
                                        safe_serialization=True)  # fmt: skip
    pipe = OneStepXLPipeline.from_teacher(teacher, lora=str(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    with_lora = pipe(**call_kwargs(pipe)).images
    pipe.unload_lora_weights()
    without = pipe(**call_kwargs(pipe)).images
    assert np.abs(with_lora - without).max() > 1e-4
    after = teacher("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images  # fmt: skip
    np.testing.assert_array_equal(after, before)


def test_pixart_lora_through_peft_saved_reloaded_unloaded(tmp_path):
    pipe = pixart_student()
    base = pipe(**call_kwargs(pipe)).images
    from peft import inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), pipe.transformer, "student")
    randomize_lora(pipe.transformer)
    with_lora = pipe(**call_kwargs(pipe)).images
    assert np.abs(with_lora - base).max() > 1e-4
    pipe.save_lora_weights(tmp_path)
    with pytest.raises(ValueError, match="carry a LoRA adapter"):
        pipe.save_pretrained(tmp_path / "refused")
    pipe.unload_lora_weights()
    np.testing.assert_allclose(pipe(**call_kwargs(pipe)).images, base, atol=1e-6)
    reloaded = OneStepPixArtPipeline.from_teacher(pixart_teacher(), transformer=pipe.transformer, lora=str(tmp_path))
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(reloaded(**call_kwargs(reloaded)).images, with_lora, atol=1e-5)


# ---------------------------------------------------------------- NASA on both


@pytest.mark.parametrize("backbone", ["sdxl", "pixart"])
def test_nasa_scale_zero_equals_no_negative_and_a_negative_changes_the_image(backbone):
    pipe = BUILDERS[backbone]()
    plain = pipe(**call_kwargs(pipe)).images
    np.testing.assert_array_equal(pipe(**call_kwargs(pipe, negative_prompt="dog", nasa_scale=0)).images, plain)
    steered = pipe(**call_kwargs(pipe, negative_prompt="dog", nasa_scale=0.5))
    assert steered.nfe == 1 and np.abs(steered.images - plain).max() > 1e-4


@torch.no_grad()
def test_sdxl_nasa_changes_only_the_cross_attention_text():
    pipe = sdxl_student()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(**call_kwargs(pipe, latents=z, negative_prompt="dog", nasa_scale=0.4, output_type="latent")).images
    embeds, negative, pooled, _ = pipe.encode_prompt("a photo of a cat", do_classifier_free_guidance=True,
                                                     negative_prompt="dog")  # fmt: skip
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])
    with nasa_attention(pipe.unet, negative, 0.4):  # pooled embeddings and time ids: the positive prompt's
        eps = pipe.unet(z, 999, encoder_hidden_states=embeds,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample  # fmt: skip
    abar = pipe.scheduler.alphas_cumprod[999]
    torch.testing.assert_close(out, (z - (1 - abar).sqrt() * eps) / abar.sqrt(), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_pixart_nasa_equals_a_hand_computed_z_minus_on_one_layer():
    """On one cross-attention layer: Z = Z+ - alpha Z- with Z- from the caption projection of the negative."""
    pipe = pixart_student()
    transformer = pipe.transformer
    embeds, mask, negative, negative_mask = pipe.encode_prompt("a photo of a cat", do_classifier_free_guidance=True,
                                                               negative_prompt="dog")  # fmt: skip
    layer = transformer.transformer_blocks[0].attn2
    hidden = torch.randn(1, 16, layer.query_dim if hasattr(layer, "query_dim") else layer.to_q.in_features)
    context = transformer.caption_projection(embeds)
    negative_context = BACKBONES["pixart"].nasa_negative(transformer, {"encoder_hidden_states": negative,
                                                                      "encoder_attention_mask": negative_mask})[0]

    def attention(ctx, keep):
        q = layer.to_q(hidden).unflatten(-1, (layer.heads, -1)).transpose(1, 2)
        k = layer.to_k(ctx).unflatten(-1, (layer.heads, -1)).transpose(1, 2)
        v = layer.to_v(ctx).unflatten(-1, (layer.heads, -1)).transpose(1, 2)
        bias = ((1.0 - keep.float()) * -10000.0)[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)

    alpha = 0.5
    expected = layer.to_out[0](attention(context, mask) - alpha * attention(negative_context, negative_mask))
    bias = ((1.0 - mask.float()) * -10000.0)[:, None, :]
    with nasa_attention(transformer, negative_context, alpha, negative_attention_mask=negative_mask):
        got = layer(hidden, encoder_hidden_states=context, attention_mask=bias)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert negative_context.shape[-1] == transformer.config.cross_attention_dim != negative.shape[-1]


# ---------------------------------------------------------------- adapters and bad teachers


def test_backbone_adapters_are_chosen_from_the_network():
    assert backbone_for(get_dummy_sdxl_components()["unet"]).name == "sdxl"
    assert backbone_for(get_dummy_pixart_components()["transformer"]).name == "pixart"
    assert backbone_for(get_dummy_teacher_components()["unet"]).name == "sd"
    with pytest.raises(ValueError, match="No backbone adapter for Linear"):
        backbone_for(torch.nn.Linear(2, 2))


def test_unsupported_teachers_and_students_are_refused_by_name():
    sd_teacher = StableDiffusionPipeline(**get_dummy_teacher_components())
    with pytest.raises(ValueError, match="StableDiffusionPipeline lacks \\['text_encoder_2', 'tokenizer_2'\\]"):
        OneStepXLPipeline.from_teacher(sd_teacher, unet=get_dummy_sdxl_components()["unet"])
    with pytest.raises(ValueError, match="lacks \\['transformer'\\]"):
        OneStepPixArtPipeline.from_teacher(sd_teacher, transformer=get_dummy_pixart_components()["transformer"])
    components = get_dummy_sdxl_components()
    sd_unet = get_dummy_teacher_components()["unet"]
    assert isinstance(sd_unet, UNet2DConditionModel)
    with pytest.raises(ValueError, match="not an SDXL UNet"):
        OneStepXLPipeline.from_teacher(StableDiffusionXLPipeline(**components), unet=sd_unet)
    with pytest.raises(ValueError, match="use_resolution_binning"):
        pixart_student()(prompt="a cat")


# ---------------------------------------------------------------- AdaptiveCollabPipeline on both


@pytest.mark.parametrize("backbone", ["sdxl", "pixart"])
def test_adaptive_pipeline_takes_sdxl_and_pixart_students_and_teachers(backbone):
    from diffusers_onestep import AdaptiveCollabPipeline, CallableOracle

    teacher = sdxl_teacher() if backbone == "sdxl" else pixart_teacher()
    student = BUILDERS[backbone](teacher)
    oracle = CallableOracle(lambda images, prompts: torch.tensor([float("cat" in p) for p in prompts]))
    pipe = AdaptiveCollabPipeline.from_pipelines(student, teacher, oracle=oracle)
    pipe.set_progress_bar_config(disable=True)
    extra = {"use_resolution_binning": False} if backbone == "pixart" else {}
    kwargs = {"threshold": 0.5, "teacher_steps": 2, "output_type": "np", "student_kwargs": extra,
              "teacher_kwargs": extra, "generator": [torch.Generator().manual_seed(i) for i in range(2)]}  # fmt: skip
    alone = student(["a cat", "a dog"], output_type="np", generator=kwargs["generator"], **extra).images
    kwargs["generator"] = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(["a cat", "a dog"], strategy="regenerate", **kwargs)
    assert out.refined.tolist() == [False, True] and out.nfe == [1, 1 + 2 * 2]
    np.testing.assert_allclose(out.images[0], alone[0], atol=1e-6)  # the kept image is the student's
    if backbone == "sdxl":
        assert pipe(["a cat", "a dog"], strategy="refine", **kwargs).nfe == [1, 5]
    else:  # diffusers has no PixArt image-to-image pipeline: said before any work
        with pytest.raises(ValueError, match="strategy='regenerate'"):
            pipe(["a cat", "a dog"], strategy="refine", **kwargs)
