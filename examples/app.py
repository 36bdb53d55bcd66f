"""Try negative prompts in one step, in a browser: a Gradio app around `diffusers_onestep.nasa`.

    pip install -e ".[app]"
    python examples/app.py                                   # the shipped digits student, http://127.0.0.1:7860
    python examples/app.py --pipeline PATH --port 7861 --share false

Inputs: prompt, negative prompt, method (none / NASA / NAG), scale (empty: the method's default), steps (1-4) and
seed. Shown: the image (small images upscaled, nearest neighbour), the wall time of the pipeline call in
milliseconds and the number of network evaluations when the pipeline reports it (`nfe`).

`generate` needs no Gradio (it is imported only by `build_app` and `main`), so it can be called and tested directly.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import diffusers_onestep  # registers the library's pipelines with diffusers' loaders


__all__ = ["DEFAULT_PIPELINE", "METHODS", "Generation", "build_app", "generate", "load_pipeline", "main"]

DEFAULT_PIPELINE = Path(__file__).resolve().parent / "digits" / "checkpoints" / "student"
METHODS = ("none", "NASA", "NAG")


@dataclass
class Generation:
    r"""What one `generate` call shows: the (upscaled) image, the pipeline call's wall time and its NFE (or `None`)."""

    image: Image.Image
    milliseconds: float
    nfe: int | None
    summary: str


def load_pipeline(path: str | Path | None = None, device: str | None = None):
    r"""
    The shipped digits student (`path=None`) as a `OneStepPipeline`, or any pipeline directory through diffusers'
    `DiffusionPipeline.from_pretrained` (safetensors only), on `device` (default: CUDA when available).
    """
    from diffusers import DiffusionPipeline

    if path is None:
        pipe = diffusers_onestep.OneStepPipeline.from_pretrained(DEFAULT_PIPELINE)
    else:
        pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _upscale(image: Image.Image, size: int) -> Image.Image:
    factor = max(1, size // max(image.size))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def generate(
    pipe,
    prompt: str,
    negative_prompt: str = "",
    method: str = "NASA",
    scale: float | None = None,
    steps: int = 1,
    seed: int = 0,
    display_size: int = 256,
) -> Generation:
    r"""
    One image for `prompt`, with `negative_prompt` applied through `diffusers_onestep.nasa` (`method` "NASA" or
    "NAG"), or the plain call (`method` "none", or an empty negative prompt).

    Args:
        pipe: a pipeline `diffusers_onestep.nasa` supports (`load_pipeline` gives one).
        scale (`float`, *optional*): NASA's alpha or NAG's phi; `None` keeps the method's default for the pipeline.
        steps (`int`): `num_inference_steps`, 1-4.
        seed (`int`): seeds a CPU `torch.Generator`, so the same inputs give the same image.
        display_size (`int`): images smaller than this are upscaled by an integer factor (nearest neighbour).
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if not 1 <= int(steps) <= 4:
        raise ValueError(f"`steps` must be in 1-4, got {steps}.")
    negative_prompt = (negative_prompt or "").strip()
    guided = method != "none" and bool(negative_prompt)
    scale = None if scale is None else float(scale)
    kwargs = {"num_inference_steps": int(steps), "generator": torch.Generator().manual_seed(int(seed)),
              "guidance_scale": 0}  # fmt: skip

    guidance = (
        diffusers_onestep.nasa(pipe, negative_prompt=negative_prompt, scale=scale, method=method.lower())
        if guided
        else nullcontext()
    )
    with guidance:
        start = time.perf_counter()
        output = pipe(prompt, **kwargs)
        milliseconds = 1000 * (time.perf_counter() - start)

    nfe = getattr(output, "nfe", None)
    parts = [f"**{milliseconds:.1f} ms**"]
    if nfe is not None:
        parts.append(f"{nfe} network evaluation{'s' if nfe != 1 else ''}")
    if guided:
        parts.append(f"{method} at {'its default scale' if scale is None else f'scale {scale:g}'}")
    elif method != "none":
        parts.append(f"{method} off (empty negative prompt)")
    return Generation(_upscale(output.images[0], display_size), milliseconds, nfe, " · ".join(parts))


def _shown_path(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def build_app(pipe):
    r"""The Gradio `Blocks` page around `generate(pipe, ...)`; element ids: prompt, negative_prompt, generate, image, info."""
    import gradio as gr

    def run(prompt, negative_prompt, method, scale, steps, seed):
        try:  # a text field: gradio's `Number` cannot stay empty, and empty means the method's default
            scale = float(scale) if scale.strip() else None
        except ValueError:
            raise gr.Error(f"Scale must be a number or empty, got {scale!r}.") from None
        result = generate(pipe, prompt, negative_prompt, method, scale, steps, 0 if seed is None else seed)
        return result.image, result.summary

    with gr.Blocks(title="diffusers-onestep: negative prompts in one step") as app:
        gr.Markdown(
            f"## Negative prompts in one step\n`{type(pipe).__name__}` from `{_shown_path(pipe.name_or_path)}`. "
            "NASA and NAG steer the attention layers away from the negative prompt: no second network pass."
        )
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value="a handwritten digit", elem_id="prompt")
                negative_prompt = gr.Textbox(
                    label="Negative prompt", placeholder="e.g. three", elem_id="negative_prompt"
                )
                method = gr.Radio(list(METHODS), value="NASA", label="Method", elem_id="method")
                scale = gr.Textbox(
                    placeholder="default", label="Scale (NASA alpha / NAG phi; empty: default)", elem_id="scale"
                )
                with gr.Row():
                    steps = gr.Slider(1, 4, value=1, step=1, label="Steps", elem_id="steps")
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                image = gr.Image(type="pil", label="Image", elem_id="image")
                info = gr.Markdown(elem_id="info")
        inputs = [prompt, negative_prompt, method, scale, steps, seed]
        button.click(run, inputs, [image, info])
        prompt.submit(run, inputs, [image, info])
    return app


def _flag(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value.lower() in ("true", "1", "yes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", default=None, help="a pipeline directory (default: the shipped digits student)")
    parser.add_argument("--port", type=int, default=7860, help="default: 7860")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (0.0.0.0: every interface)")
    parser.add_argument(
        "--share", type=_flag, default=False, help="true: also serve through a public Gradio share link"
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    args = parser.parse_args(argv)

    app = build_app(load_pipeline(args.pipeline, args.device))
    app.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
