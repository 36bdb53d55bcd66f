r"""`diffusers_onestep.nasa(pipe, ...)`: attention-space negative prompts (NASA or NAG) for a whole pipeline call.

    with diffusers_onestep.nasa(pipe, negative_prompt="cat", scale=0.3):
        image = pipe("a photo of a pet", guidance_scale=0).images[0]

Supported: diffusers' `StableDiffusionPipeline` (1.x / 2.x) and `LatentConsistencyModelPipeline`,
`StableDiffusionXLPipeline`, `PixArtAlphaPipeline` / `PixArtSigmaPipeline`, `StableDiffusion3Pipeline`,
`FluxPipeline` (so every LCM / TCD / Turbo / Lightning / DMD2 / schnell checkpoint loaded with them), and this
library's `OneStepPipeline`, `OneStepXLPipeline`, `OneStepPixArtPipeline`.

How, on a diffusers pipeline: for the block, the pipeline's own `encode_prompt` is wrapped on the instance; whenever
the pipeline encodes its prompts, the negative is encoded by the same function with the same arguments
(`num_images_per_prompt`, `max_sequence_length`, `clip_skip`, LoRA scale, ...), one negative per prompt, so it has
the positive's batch and order. The denoiser's attention layers get guidance processors bound to that negative
(nothing goes through `cross_attention_kwargs` / `joint_attention_kwargs`, so diffusers logs no unused-kwargs
warnings), and forward hooks on the denoiser match it to each call's batch (tiled for CFG's `[uncond, cond]`),
project it where the network projects its text (PixArt's `caption_projection`), and turn guidance off outside its
`end` fraction. On exit (also on error) the exact previous processors come back and every hook is removed.
On this library's pipelines, which take negative prompts natively, the block supplies `negative_prompt` (or
`negative_prompt_embeds`), the scale and the method to calls that pass none.

Per attention kind (what is computed, and what it costs per layer):

- UNet cross-attention (`attn2` of SD / SDXL): `Z+`, `Z-` from the same queries and `to_k` / `to_v`; one extra
  attention over the negative tokens. SDXL's pooled embeddings and time ids stay positive.
- DiT cross-attention (PixArt): the same, on the negative after the transformer's `caption_projection`.
- MMDiT joint attention (SD3, Flux double and single blocks): see `attention.joint`; one extra joint attention and
  the negative text's own stream.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, contextmanager

import torch
from diffusers import (
    FluxPipeline,
    LatentConsistencyModelPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.models.normalization import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    AdaLayerNormZeroSingle,
    SD35AdaLayerNormZeroX,
)

from .guidance import NegativeGuidance, make_guidance
from .joint import FluxNegativeAttnProcessor, JointNegativeAttnProcessor
from .nasa import _cross_attention_modules, negative_processor


__all__ = ["guided_cross_attention", "nasa", "pipeline_family"]

# diffusers pipeline class -> family (NAG_DEFAULTS key); subclasses count as their base
DIFFUSERS_FAMILIES: dict[type, str] = {
    StableDiffusionPipeline: "sd",
    LatentConsistencyModelPipeline: "sd",
    StableDiffusionXLPipeline: "sdxl",
    PixArtAlphaPipeline: "pixart",
    PixArtSigmaPipeline: "pixart",
    StableDiffusion3Pipeline: "sd3",
    FluxPipeline: "flux",
}
# SNOOPI's NASA scales (SD1.5 0.1, SD2.1 0.2, PixArt-α 0.5; SDXL: this library's default, see OneStepXLPipeline).
# SD3 and Flux have none: SNOOPI v3 reports FLUX.1-schnell results without the scale, so `scale` is required there.
NASA_DEFAULTS = {"sd": 0.1, "sd2": 0.2, "sdxl": 0.2, "pixart": 0.5}
# the MMDiTs' timestep argument as a fraction of the trajectory: divided by this (the others: the scheduler's T)
_JOINT_TIMESTEP_RANGE = {"sd3": 1000.0, "flux": 1.0}


def pipeline_family(pipe) -> str:
    r"""`"sd"`, `"sdxl"`, `"pixart"`, `"sd3"` or `"flux"`; raises `TypeError` naming the class for any other pipeline."""
    from ..pipelines.pipeline_onestep import OneStepPipeline
    from ..pipelines.pipeline_onestep_pixart import OneStepPixArtPipeline
    from ..pipelines.pipeline_onestep_xl import OneStepXLPipeline

    ours = {OneStepPipeline: "sd", OneStepXLPipeline: "sdxl", OneStepPixArtPipeline: "pixart"}
    for cls, family in {**ours, **DIFFUSERS_FAMILIES}.items():
        if isinstance(pipe, cls):
            return family
    names = ", ".join(sorted(c.__name__ for c in {**DIFFUSERS_FAMILIES, **ours}))
    raise TypeError(f"`nasa` does not support {type(pipe).__name__}; supported pipelines: {names}.")


class _State:
    r"""What the processors and hooks of one `nasa` block share; `encoded` is set by the wrapped `encode_prompt`."""

    def __init__(self):
        self.encoded: dict | None = None  # {"embeds", "mask", "pooled"} at the positive's batch
        self.negative = self.negative_mask = None  # cross-attention: the negative for this network call
        self.fraction: float | None = None
        self.active = False
        self.batch = 0
        self.text_tokens = 0


def _tile_to(tensor: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if tensor is None or tensor.shape[0] == batch:
        return tensor
    if batch % tensor.shape[0]:
        raise ValueError(
            f"The negative has batch {tensor.shape[0]} but the network is called with batch {batch}: pass one "
            "`negative_prompt` or one per prompt."
        )
    return tensor.repeat(batch // tensor.shape[0], *([1] * (tensor.ndim - 1)))


def _fraction(args: tuple, kwargs: dict, timestep_range: float) -> float | None:
    """The network call's timestep (keyword or second positional argument) as a fraction of `timestep_range`."""
    timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    return None if timestep is None else float(torch.as_tensor(timestep).flatten()[0]) / timestep_range


def _cross_pre_hook(state: _State, guidance: NegativeGuidance, timestep_range: float, projection=None):
    def hook(module, args, kwargs):
        sample = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        state.fraction = _fraction(args, kwargs, timestep_range)
        state.active = state.encoded is not None and guidance.active_at(state.fraction)
        state.negative = state.negative_mask = None
        if state.active:
            negative = _tile_to(state.encoded["embeds"], sample.shape[0]).to(sample.device)
            negative = negative.to(next(module.parameters()).dtype)
            state.negative = projection(negative) if projection is not None else negative
            state.negative_mask = _tile_to(state.encoded.get("mask"), sample.shape[0])
        return None

    return hook


@contextmanager
def guided_cross_attention(network, encoded: dict, guidance: NegativeGuidance, *, timestep_range: float,
                           projection=None):  # fmt: skip
    r"""
    The guidance on every cross-attention layer of `network` (a UNet or a DiT) for the block: `encoded["embeds"]`
    (and `encoded.get("mask")`) is the negative at the prompt batch, tiled to each call's batch, passed through
    `projection` (the network's caption projection) and applied while `guidance.active_at(t / timestep_range)`.
    """
    state = _State()
    state.encoded = encoded
    modules = list(_cross_attention_modules(network))
    if not modules:
        raise ValueError(f"{type(network).__name__} has no cross-attention layers: the guidance needs text conditioning.")
    originals = [(module, module.processor) for module in modules]
    handle = network.register_forward_pre_hook(
        _cross_pre_hook(state, guidance, timestep_range, projection), with_kwargs=True
    )
    try:
        for module, processor in originals:
            base = getattr(processor, "base_processor", processor)
            module.set_processor(negative_processor(guidance, base, source=state))
        yield state
    finally:
        handle.remove()
        for module, processor in originals:
            module.set_processor(processor)


def _slice_conditioning(state: _State):
    """Pre-hook of an image-side AdaLN: the first `x.shape[0]` rows of its conditioning (the positive rows)."""

    def hook(module, args, kwargs):
        if not state.active:
            return None
        rows = (args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))).shape[0]

        def cut(v):
            return v[:rows] if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == 2 * rows else v

        return (args[0], *map(cut, args[1:])) if args else args, {k: cut(v) for k, v in kwargs.items()}

    return hook


def _joint_pre_hook(state: _State, guidance: NegativeGuidance, timestep_range: float):
    """Transformer pre-hook: the negative text (and pooled embedding, timestep, guidance) as extra batch rows."""

    def hook(module, args, kwargs):
        if args:
            raise TypeError(f"`nasa` needs {type(module).__name__} called with keyword arguments, as diffusers does.")
        state.fraction = _fraction(args, kwargs, timestep_range)
        state.active = state.encoded is not None and guidance.active_at(state.fraction)
        if not state.active:
            return None
        batch = kwargs["hidden_states"].shape[0]
        positive = kwargs["encoder_hidden_states"]
        negative = _tile_to(state.encoded["embeds"], batch).to(positive)
        if negative.shape[1] != positive.shape[1]:
            raise ValueError(
                f"The negative has {negative.shape[1]} text tokens and the prompt {positive.shape[1]}: joint attention "
                "needs both at one length (pass embeddings encoded with the call's `max_sequence_length`)."
            )
        kwargs = dict(kwargs, encoder_hidden_states=torch.cat([positive, negative]))
        kwargs["pooled_projections"] = torch.cat(
            [kwargs["pooled_projections"], _tile_to(state.encoded["pooled"], batch).to(positive)]
        )
        for name in ("timestep", "guidance"):
            value = kwargs.get(name)
            if torch.is_tensor(value) and value.ndim == 1 and value.shape[0] == batch:
                kwargs[name] = value.repeat(2)
        state.batch, state.text_tokens = batch, positive.shape[1]
        return args, kwargs

    return hook


def _install_joint(stack: ExitStack, transformer, guidance: NegativeGuidance, state: _State, family: str) -> None:
    handles = [transformer.register_forward_pre_hook(_joint_pre_hook(state, guidance, _JOINT_TIMESTEP_RANGE[family]),
                                                     with_kwargs=True)]  # fmt: skip
    image_norms = [block.norm1 for block in transformer.transformer_blocks] + [transformer.norm_out]
    for norm in image_norms:
        if isinstance(norm, (AdaLayerNormZero, SD35AdaLayerNormZeroX, AdaLayerNormContinuous)):
            handles.append(norm.register_forward_pre_hook(_slice_conditioning(state), with_kwargs=True))
    processor_cls = FluxNegativeAttnProcessor if family == "flux" else JointNegativeAttnProcessor
    attns = [block.attn for block in transformer.transformer_blocks]
    for block in getattr(transformer, "single_transformer_blocks", []):
        attns.append(block.attn)
        handles += _single_block_hooks(block, state)
    originals = [(attn, attn.processor) for attn in attns]
    stack.callback(lambda: [h.remove() for h in handles])
    stack.callback(lambda: [attn.set_processor(p) for attn, p in originals])
    stock = {"flux": "FluxAttnProcessor", "sd3": "JointAttnProcessor2_0"}[family]
    for attn, processor in originals:
        if type(processor).__name__ != stock:
            raise ValueError(
                f"`nasa` on {type(transformer).__name__} needs its stock `{stock}` processors; found "
                f"{type(processor).__name__} (an IP-Adapter or another extension): unload it first."
            )
        attn.set_processor(processor_cls(guidance, state, processor))


def _single_block_hooks(block, state: _State) -> list:
    r"""Flux single blocks: image rows duplicated in, the positive image stream normalised for both, `B` rows out."""

    def enter(module, args, kwargs):
        hidden, text = kwargs.get("hidden_states"), kwargs.get("encoder_hidden_states")
        if state.active and hidden is not None and text is not None and text.shape[0] == 2 * hidden.shape[0]:
            return args, dict(kwargs, hidden_states=hidden.repeat(2, 1, 1))
        return None

    def normalised(module, args, output):
        if not state.active or not isinstance(module, AdaLayerNormZeroSingle):
            return None
        x, gate = output
        if x.shape[0] != 2 * state.batch:
            return None
        x = x.clone()
        x[state.batch :, state.text_tokens :] = x[: state.batch, state.text_tokens :]
        return x, gate

    def leave(module, args, kwargs, output):
        text, hidden = output
        if state.active and hidden.shape[0] == 2 * state.batch:
            return text, hidden[: state.batch]
        return None

    return [
        block.register_forward_pre_hook(enter, with_kwargs=True),
        block.norm.register_forward_hook(normalised),
        block.register_forward_hook(leave, with_kwargs=True),
    ]


# --------------------------------------------------------------------------- encoding the negative


def _negative_call(bound: dict, negative: dict, prompt_batch: int) -> dict:
    """The arguments of `encode_prompt` for the negative: the positive's, with the prompts replaced."""
    call = dict(bound)
    prompts = negative["prompt"]
    if isinstance(prompts, str):
        prompts = [prompts] * prompt_batch
    elif prompts is not None and len(prompts) != prompt_batch:
        raise ValueError(
            f"`negative_prompt` has {len(prompts)} entries for {prompt_batch} prompts: pass one string or one per prompt."
        )
    for name in list(call):
        if name.startswith("negative_"):
            call[name] = None
    for name in ("prompt_2", "prompt_3"):
        if name in call:
            call[name] = None
    call["prompt"] = prompts
    call["prompt_embeds"] = _expand(negative.get("embeds"), prompt_batch)
    if "pooled_prompt_embeds" in call:
        call["pooled_prompt_embeds"] = _expand(negative.get("pooled"), prompt_batch)
    if "prompt_attention_mask" in call:
        call["prompt_attention_mask"] = _expand(negative.get("mask"), prompt_batch)
    if "do_classifier_free_guidance" in call:
        call["do_classifier_free_guidance"] = False
    return call


def _expand(tensor, batch):
    if tensor is None or tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"The negative embeddings have batch {tensor.shape[0]}; expected 1 or {batch} (one per prompt).")


# where each family's encode_prompt returns (embeds, mask, pooled)
_OUTPUTS = {"sd": (0, None, None), "sdxl": (0, None, 2), "pixart": (0, 1, None), "sd3": (0, None, 2),
            "flux": (0, None, 1)}  # fmt: skip


def _wrap_encode(stack: ExitStack, pipe, family: str, state: _State, negative: dict) -> None:
    original = pipe.encode_prompt
    signature = inspect.signature(original)
    had_own = "encode_prompt" in vars(pipe)

    def encode_prompt(*args, **kwargs):
        output = original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop("kwargs", {}))
        prompt, embeds = arguments.get("prompt"), arguments.get("prompt_embeds")
        prompt_batch = embeds.shape[0] if embeds is not None else 1 if isinstance(prompt, str) else len(prompt)
        neg = original(**_negative_call(arguments, negative, prompt_batch))
        embeds_at, mask_at, pooled_at = _OUTPUTS[family]
        state.encoded = {
            "embeds": neg[embeds_at],
            "mask": None if mask_at is None else neg[mask_at],
            "pooled": None if pooled_at is None else neg[pooled_at],
        }
        return output

    pipe.encode_prompt = encode_prompt
    stack.callback(lambda: setattr(pipe, "encode_prompt", original) if had_own else delattr(pipe, "encode_prompt"))


def _default_nasa_scale(pipe, family: str) -> float:
    if family in ("sd3", "flux"):
        raise ValueError(
            f"`scale` is required for NASA on {type(pipe).__name__}: SNOOPI gives no NASA scale for {family.upper()} "
            "(try a value in [0.05, 0.5], or `method='nag'`, whose defaults the NAG paper gives)."
        )
    if family == "sd" and pipe.unet.config.cross_attention_dim == 1024:
        return NASA_DEFAULTS["sd2"]
    return NASA_DEFAULTS[family]


@contextmanager
def nasa(
    pipe,
    negative_prompt: str | list[str] | None = None,
    scale: float | None = None,
    *,
    method: str = "nasa",
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    negative_prompt_attention_mask: torch.Tensor | None = None,
    tau: float | None = None,
    alpha: float | None = None,
    end: float = 1.0,
    norm_p: float | None = None,
):
    r"""
    Negative prompts through attention (NASA or NAG) for every call of `pipe` inside the block; see the module
    docstring for what each attention kind computes.

    Args:
        pipe: a supported pipeline (`pipeline_family` lists them); any other raises `TypeError` naming its class.
        negative_prompt (`str` or `list[str]`): one negative for all prompts, or one per prompt.
        scale (`float`, *optional*): NASA's `alpha` (SNOOPI defaults: SD1.5 0.1, SD2.x 0.2, PixArt 0.5; SDXL 0.2,
            this library's; required for SD3 and Flux) or NAG's `phi` (its paper's per-family default).
        method (`str`, defaults to `"nasa"`): `"nasa"` (SNOOPI Eq. 7) or `"nag"` (Normalized Attention Guidance).
        negative_prompt_embeds, negative_pooled_prompt_embeds, negative_prompt_attention_mask: the negative as
            embeddings (batch 1 or one per prompt) instead of text, as the pipeline's `encode_prompt` takes them
            (pooled: SDXL / SD3 / Flux; mask: PixArt).
        tau, alpha, norm_p: NAG's clipping threshold, blend and norm (paper defaults per family; `norm_p` 1, 2 on
            Flux as its official code).
        end (`float`, defaults to 1.0): the fraction of the trajectory (from the noisy end) guided, as NAG's
            `nag_end`; NAG's paper applies it to the first 25% of steps on few-step models.
    """
    family = pipeline_family(pipe)
    if method not in ("nasa", "nag"):
        raise ValueError(f"`method` must be one of 'nasa', 'nag', got {method!r}.")
    if negative_prompt is None and negative_prompt_embeds is None:
        raise ValueError("`nasa` needs `negative_prompt` or `negative_prompt_embeds`.")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
    if family in ("sd3", "flux", "sdxl") and negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
        raise ValueError(f"`negative_pooled_prompt_embeds` is required with `negative_prompt_embeds` on {family}.")
    if scale is None and method == "nasa":
        scale = pipe.config.nasa_scale if hasattr(pipe.config, "nasa_scale") else _default_nasa_scale(pipe, family)
    guidance = make_guidance(method, family, scale=scale, tau=tau, alpha=alpha, end=end, norm_p=norm_p)

    if hasattr(pipe, "context_guidance"):  # this library's pipelines take negatives natively
        previous = pipe.context_guidance
        pipe.context_guidance = {
            "negative_prompt": negative_prompt, "negative_prompt_embeds": negative_prompt_embeds,
            "negative_pooled_prompt_embeds": negative_pooled_prompt_embeds,
            "negative_prompt_attention_mask": negative_prompt_attention_mask, "guidance": guidance,
        }  # fmt: skip
        try:
            yield pipe
        finally:
            pipe.context_guidance = previous
        return

    negative = {"prompt": negative_prompt, "embeds": negative_prompt_embeds, "pooled": negative_pooled_prompt_embeds,
                "mask": negative_prompt_attention_mask}  # fmt: skip
    with ExitStack() as stack:
        if guidance.is_identity:
            yield pipe
            return
        if family in ("sd3", "flux"):
            state = _State()
            _install_joint(stack, pipe.transformer, guidance, state, family)
        else:
            network = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
            projection = getattr(network, "caption_projection", None) if family == "pixart" else None
            timestep_range = float(pipe.scheduler.config.num_train_timesteps)
            state = stack.enter_context(
                guided_cross_attention(network, None, guidance, timestep_range=timestep_range, projection=projection)
            )
        _wrap_encode(stack, pipe, family, state, negative)
        yield pipe
