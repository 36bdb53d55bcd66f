"""`diffusers_onestep.nasa` on diffusers' own pipelines (SD, LCM-scheduled SD, SDXL, PixArt, SD3, Flux) and ours."""

import logging

import pytest
import torch
from diffusers import (
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
)
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

import diffusers_onestep
from diffusers_onestep import OneStepPipeline
from diffusers_onestep.attention import (
    FluxNegativeAttnProcessor,
    JointNegativeAttnProcessor,
    NAGGuidance,
    NASAGuidance,
)
from diffusers_onestep.testing_utils import (
    DUMMY_CALL_KWARGS,
    get_dummy_components,
    get_dummy_pipeline,
    get_dummy_teacher_components,
)


def _sd():
    return get_dummy_pipeline("sd")


FAMILIES = list(DUMMY_CALL_KWARGS)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    pipe = get_dummy_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe, DUMMY_CALL_KWARGS[request.param]


def _network(pipe):
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def _run(pipe, kwargs, prompt="a photo of a cat", steps=2, **extra):
    return pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="pt", num_inference_steps=steps,
                height=16, width=16, guidance_scale=1.0, **kwargs, **extra).images  # fmt: skip


def test_scale_zero_is_stock_and_guidance_changes_the_image_and_restores(family, caplog):
    name, pipe, kwargs = family
    before = dict(_network(pipe).attn_processors)
    stock = _run(pipe, kwargs)
    with diffusers_onestep.nasa(pipe, negative_prompt="dog", scale=0.0):
        torch.testing.assert_close(_run(pipe, kwargs), stock, rtol=0, atol=0)
    with caplog.at_level(logging.WARNING):
        for method in ("nasa", "nag"):
            with diffusers_onestep.nasa(pipe, negative_prompt="dog", scale=0.5, method=method):
                assert (_run(pipe, kwargs) - stock).abs().max() > 1e-4, method
    assert not [r for r in caplog.records if "expected" in r.getMessage() or "ignored" in r.getMessage()]
    after = _network(pipe).attn_processors
    assert all(after[k] is v for k, v in before.items()) and "encode_prompt" not in vars(pipe)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in _network(pipe).modules())


def test_nag_with_the_prompt_as_negative_is_the_stock_pipeline(family):
    # Z+ = Z- makes NAG the identity in every layer: the whole path (duplicated text rows, modulation, hooks) is exact
    name, pipe, kwargs = family
    stock = _run(pipe, kwargs)
    with diffusers_onestep.nasa(pipe, negative_prompt="a photo of a cat", method="nag", scale=3.0, alpha=1.0):
        torch.testing.assert_close(_run(pipe, kwargs), stock, rtol=1e-4, atol=1e-5)


def test_per_sample_negatives_equal_separate_calls(family):
    name, pipe, kwargs = family
    prompts, negatives = ["a photo of a cat", "a photo of a dog"], ["dog", "cat"]
    with diffusers_onestep.nasa(pipe, negative_prompt=negatives, scale=0.5):
        both = pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in (0, 0, 1, 1)], output_type="pt",
                    num_inference_steps=2, height=16, width=16, guidance_scale=1.0, num_images_per_prompt=2,
                    **kwargs).images  # fmt: skip
    for i, (prompt, negative) in enumerate(zip(prompts, negatives)):
        with diffusers_onestep.nasa(pipe, negative_prompt=negative, scale=0.5):
            alone = pipe(prompt, generator=[torch.Generator().manual_seed(i) for _ in range(2)], output_type="pt",
                         num_inference_steps=2, height=16, width=16, guidance_scale=1.0, num_images_per_prompt=2,
                         **kwargs).images  # fmt: skip
        torch.testing.assert_close(both[2 * i : 2 * i + 2], alone, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="negative_prompt"):
        with diffusers_onestep.nasa(pipe, negative_prompt=["a", "b", "c"], scale=0.5):
            pipe(prompts, num_inference_steps=1, height=16, width=16, guidance_scale=1.0, **kwargs)
    assert "encode_prompt" not in vars(pipe)


def test_negative_prompt_embeds_equal_the_text(family):
    name, pipe, kwargs = family
    with diffusers_onestep.nasa(pipe, negative_prompt="dog", scale=0.5):
        text = _run(pipe, kwargs)
    encode = {"sd": lambda: pipe.encode_prompt("dog", "cpu", 1, False),
              "sdxl": lambda: pipe.encode_prompt("dog", device="cpu", do_classifier_free_guidance=False),
              "pixart": lambda: pipe.encode_prompt("dog", do_classifier_free_guidance=False, max_sequence_length=16),
              "sd3": lambda: pipe.encode_prompt("dog", None, None, do_classifier_free_guidance=False,
                                                max_sequence_length=16),
              "flux": lambda: pipe.encode_prompt("dog", None, max_sequence_length=16)}[name]()  # fmt: skip
    embeds = {"negative_prompt_embeds": encode[0]}
    if name in ("sdxl", "sd3"):
        embeds["negative_pooled_prompt_embeds"] = encode[2]
    elif name == "flux":
        embeds["negative_pooled_prompt_embeds"] = encode[1]
    elif name == "pixart":
        embeds["negative_prompt_attention_mask"] = encode[1]
    with diffusers_onestep.nasa(pipe, scale=0.5, **embeds):
        torch.testing.assert_close(_run(pipe, kwargs), text, rtol=1e-5, atol=1e-6)


def test_end_fraction_limits_the_guided_steps(family):
    name, pipe, kwargs = family
    seen = []
    network = _network(pipe)
    handle = network.register_forward_pre_hook(
        lambda m, a, k: seen.append(float(torch.as_tensor(k.get("timestep", a[1] if len(a) > 1 else None)).flatten()[0])),
        with_kwargs=True,
    )
    stock = _run(pipe, kwargs)
    handle.remove()
    total = {"sd3": 1000.0, "flux": 1.0}.get(name, pipe.scheduler.config.num_train_timesteps)
    first, second = (t / total for t in seen)
    assert first > second
    with diffusers_onestep.nasa(pipe, negative_prompt="dog", scale=0.5):
        guided = _run(pipe, kwargs)
    # guided while t / T >= 1 - end: between the two steps' fractions, only the first step is guided
    with diffusers_onestep.nasa(pipe, negative_prompt="dog", scale=0.5, end=1 - (first + second) / 2):
        first_only = _run(pipe, kwargs)
    assert (first_only - stock).abs().max() > 1e-5 and (first_only - guided).abs().max() > 0
    if first < 1:  # a trajectory that does not start at t = T: an end below 1 - first guides no step at all
        with diffusers_onestep.nasa(pipe, negative_prompt="dog", scale=0.5, end=(1 - first) / 2):
            torch.testing.assert_close(_run(pipe, kwargs), stock, rtol=0, atol=0)


def test_processors_are_restored_on_error():
    pipe = _sd()
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with diffusers_onestep.nasa(pipe, negative_prompt="dog", scale=0.3):
            assert any(type(p).__name__ == "NASAAttnProcessor" for p in pipe.unet.attn_processors.values())
            raise RuntimeError("boom")
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items()) and "encode_prompt" not in vars(pipe)


def test_other_pipelines_and_bad_arguments_are_refused():
    img2img = StableDiffusionImg2ImgPipeline(**get_dummy_teacher_components())
    with pytest.raises(TypeError, match="StableDiffusionImg2ImgPipeline.*supported pipelines: .*FluxPipeline"):
        with diffusers_onestep.nasa(img2img, negative_prompt="dog"):
            pass
    pipe = _sd()
    for kwargs, match in (({"method": "cfg"}, "`method` must be one of 'nasa', 'nag'"), ({}, "negative_prompt"),
                          ({"scale": -1.0}, "`scale`"), ({"method": "nag", "tau": 0.5}, "`tau`"),
                          ({"end": 0.0}, "`end`"), ({"tau": 2.0}, "NAG's parameters")):  # fmt: skip
        kwargs = {"negative_prompt": "dog", **kwargs} if kwargs != {} else kwargs
        with pytest.raises(ValueError, match=match):
            with diffusers_onestep.nasa(pipe, **kwargs):
                pass
    flux = get_dummy_pipeline("flux")
    with pytest.raises(ValueError, match="`scale` is required for NASA on FluxPipeline"):
        with diffusers_onestep.nasa(flux, negative_prompt="dog"):
            pass


def test_nasa_inside_a_two_step_lcm_scheduled_stable_diffusion_pipeline():
    pipe = _sd()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    stock = _run(pipe, {}, steps=2)
    with diffusers_onestep.nasa(pipe, negative_prompt="dog", scale=0.0):
        torch.testing.assert_close(_run(pipe, {}, steps=2), stock, rtol=0, atol=0)
    with diffusers_onestep.nasa(pipe, negative_prompt="dog"):  # SD1.x default 0.1 (cross-attention width 32 != 1024)
        steered = _run(pipe, {}, steps=2)
    with diffusers_onestep.nasa(pipe, negative_prompt="dog", scale=0.1):
        torch.testing.assert_close(_run(pipe, {}, steps=2), steered, rtol=0, atol=0)
    assert (steered - stock).abs().max() > 1e-5


def test_our_pipeline_in_the_block_equals_its_native_negative_prompt():
    pipe = OneStepPipeline(**get_dummy_components())
    pipe.set_progress_bar_config(disable=True)
    native = pipe("a photo of a cat", negative_prompt="dog", nasa_scale=0.4, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images  # fmt: skip
    with diffusers_onestep.nasa(pipe, negative_prompt="dog", scale=0.4):
        inside = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="pt").images
        # a call's own negative prompt wins over the block's
        own = pipe("a photo of a cat", negative_prompt="cat", generator=torch.Generator().manual_seed(0),
                   output_type="pt").images  # fmt: skip
    torch.testing.assert_close(inside, native, rtol=0, atol=0)
    assert (own - native).abs().max() > 1e-6 and pipe.context_guidance is None
    with diffusers_onestep.nasa(pipe, negative_prompt="dog", method="nag"):
        nag = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (nag - native).abs().max() > 1e-6
    with diffusers_onestep.nasa(pipe, negative_prompt="dog"), pytest.raises(ValueError, match="guidance_scale"):
        pipe("a photo of a cat", guidance_scale=2.0)  # our calls refuse NASA and CFG together
    assert pipe.context_guidance is None


# ---------------------------------------------------------------- one layer of each joint kind, by hand


def _joint_attention(seed=0, dim=16, heads=2, **kwargs):
    torch.manual_seed(seed)
    return Attention(query_dim=dim, added_kv_proj_dim=dim, dim_head=dim // heads, heads=heads, out_dim=dim,
                     context_pre_only=False, bias=True, processor=JointAttnProcessor2_0(), qk_norm="rms_norm",
                     eps=1e-6, **kwargs).eval()  # fmt: skip


class _Source:
    active, batch, text_tokens = True, 2, 3


@pytest.mark.parametrize("guidance", [NASAGuidance(scale=0.4), NAGGuidance(scale=2.0, tau=1.5, alpha=0.7)])
def test_sd3_joint_layer_by_hand(guidance):
    attn = _joint_attention()
    image, pos, neg = torch.randn(2, 5, 16), torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    got_image, got_text = JointNegativeAttnProcessor(guidance, _Source())(attn, image, torch.cat([pos, neg]))
    # by hand: each text row attends jointly with the image; the pre-projection image outputs are combined
    stock = JointAttnProcessor2_0()
    out_w, out_b = attn.to_out[0].weight, attn.to_out[0].bias
    z = {}
    for key, text in (("pos", pos), ("neg", neg)):
        image_out, text_out = stock(attn, image, text)
        z[key] = (image_out - out_b) @ torch.linalg.inv(out_w).T  # undo the affine output projection
        z[key + "_text"] = text_out
    expected = guidance.combine(z["pos"], z["neg"]) @ out_w.T + out_b
    torch.testing.assert_close(got_image, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_text, torch.cat([z["pos_text"], z["neg_text"]]), rtol=1e-5, atol=1e-6)
    if isinstance(guidance, NASAGuidance):  # Z+ - alpha Z-, written out
        plain = (z["pos"] - 0.4 * z["neg"]) @ out_w.T + out_b
        torch.testing.assert_close(got_image, plain, rtol=1e-4, atol=1e-5)


def _flux_attention(single: bool, seed=0, dim=16, heads=2):
    torch.manual_seed(seed)
    extra = {"pre_only": True} if single else {"added_kv_proj_dim": dim, "context_pre_only": False}
    return FluxAttention(query_dim=dim, dim_head=dim // heads, heads=heads, out_dim=dim, bias=True, eps=1e-6,
                         processor=FluxAttnProcessor(), **extra).eval()  # fmt: skip


def test_flux_double_and_single_stream_layers_by_hand():
    guidance = NASAGuidance(scale=0.3)
    stock = FluxAttnProcessor()
    # double stream: B image rows, 2B text rows
    attn = _flux_attention(single=False)
    image, pos, neg = torch.randn(2, 5, 16), torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    got_image, got_text = FluxNegativeAttnProcessor(guidance, _Source())(attn, image, torch.cat([pos, neg]))
    (image_pos, text_pos), (image_neg, text_neg) = stock(attn, image, pos), stock(attn, image, neg)
    bias = attn.to_out[0].bias
    torch.testing.assert_close(got_image, image_pos - 0.3 * (image_neg - bias), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_text, torch.cat([text_pos, text_neg]), rtol=1e-5, atol=1e-6)
    # single stream: one [text; image] sequence of 2B rows; only the image tokens are combined (no output projection)
    attn = _flux_attention(single=True)
    image = torch.randn(2, 5, 16)
    rows = torch.cat([torch.cat([pos, image], 1), torch.cat([neg, image], 1)])
    got = FluxNegativeAttnProcessor(guidance, _Source())(attn, rows)
    plain = stock(attn, rows)
    combined = plain[:2, 3:] - 0.3 * plain[2:, 3:]
    torch.testing.assert_close(got[:2, 3:], combined, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2:, 3:], combined, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[:, :3], plain[:, :3], rtol=0, atol=0)
