"""The declared dependency ranges hold, and what they guard works under them (issue 8, item 10).

transformers' PEFT integration raises "The version of PEFT you are using is not compatible" from `add_adapter`,
`set_adapter`, `active_adapters`, `get_adapter_state_dict`, ... unless peft >= its `MIN_PEFT_VERSION` (0.22 from
transformers 5.24 on, while the newest peft on PyPI is 0.21.2), so pyproject.toml caps transformers below 5.24. Its
floor keeps the shipped checkpoints' text encoder loading whole. These tests fail if the installed combination leaves
the declared ranges or the ranges stop being enough.
"""

import copy
import os
from importlib.metadata import requires, version

import numpy as np
import pytest
import torch
import transformers.integrations.peft as transformers_peft
from diffusers import StableDiffusionPipeline
from packaging.requirements import Requirement
from packaging.version import Version
from peft import LoraConfig, get_peft_model_state_dict

from diffusers_onestep import ConsistencyStudentScheduler, OneStepPipeline
from diffusers_onestep.testing_utils import get_dummy_components, get_dummy_teacher_components


TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Not a substring of any base parameter name: transformers' `load_adapter` tells adapter keys from base keys by
# substring, so a name like "a" or "b" ("layer", "base_layer") makes it report every base weight as "MISSING".
ADAPTER = "sketch"


def _declared() -> dict[str, Requirement]:
    """The package's own requirements as installed (`pip install -e .` refreshes them from pyproject.toml)."""
    requirements = [Requirement(line) for line in requires("diffusers-onestep")]
    return {r.name.lower().replace("_", "-"): r for r in requirements if r.marker is None}


@pytest.mark.parametrize("name", ["torch", "diffusers", "transformers", "peft", "accelerate", "huggingface-hub"])
def test_installed_version_is_in_declared_range(name):
    requirement = _declared()[name]
    installed = version(name)
    assert requirement.specifier.contains(installed, prereleases=True), f"{name} {installed} is outside {requirement}"


def test_declared_peft_floor_meets_transformers_peft_floor():
    """Any peft the ranges admit passes transformers' check (here, for the installed transformers)."""
    minimum = Version(transformers_peft.MIN_PEFT_VERSION)
    peft_floor = min(Version(s.version) for s in _declared()["peft"].specifier if s.operator in (">=", "=="))
    assert peft_floor >= minimum, f"transformers {version('transformers')} wants peft >= {minimum}"
    assert Version(version("peft")) >= minimum


def test_shipped_text_encoder_loads_every_weight():
    """transformers < 5.6 names CLIPTextModel's weights `text_model.*`: the shipped (flattened) checkpoint would load
    into a randomly initialised text encoder with a warning, not an error."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "digits",
                        "checkpoints", "teacher", "text_encoder")  # fmt: skip
    saved = load_file(os.path.join(path, "model.safetensors"))
    loaded = CLIPTextModel.from_pretrained(path, use_safetensors=True).state_dict()
    assert set(saved) <= set(loaded), sorted(set(saved) - set(loaded))[:5]
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name].to(tensor.dtype), tensor, atol=0, rtol=0, msg=name)


def _tiny(pipeline_class):
    if pipeline_class is OneStepPipeline:
        components = get_dummy_components()
        scheduler = ConsistencyStudentScheduler.from_config(components.pop("scheduler").config)
        pipe = OneStepPipeline(**components, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(**get_dummy_teacher_components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encode(pipe, prompt="a photo of a cat"):
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _call(pipe):
    kwargs = {"num_inference_steps": 1} if isinstance(pipe, OneStepPipeline) else {"num_inference_steps": 2}
    return pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


@pytest.mark.parametrize("pipeline_class", [OneStepPipeline, StableDiffusionPipeline])
def test_text_encoder_lora_loads_and_adapter_api_works(tmp_path, pipeline_class):
    # 1. A text-encoder LoRA with non-zero weights, made on a copy and saved in diffusers' LoRA format
    pipe = _tiny(pipeline_class)
    base_embeds, base_images = _encode(pipe), _call(pipe)
    trained = copy.deepcopy(pipe.text_encoder)
    trained.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TEXT_ENCODER_TARGETS, init_lora_weights=False),
                        adapter_name=ADAPTER)  # fmt: skip
    with torch.no_grad():
        expected_embeds = trained(pipe.tokenizer(["a photo of a cat"], padding="max_length",
                                                 max_length=pipe.tokenizer.model_max_length,
                                                 return_tensors="pt").input_ids)[0]  # fmt: skip
    assert (expected_embeds - base_embeds).abs().max() > 1e-3
    state_dict = get_peft_model_state_dict(trained, adapter_name=ADAPTER)
    pipeline_class.save_lora_weights(tmp_path, text_encoder_lora_layers=state_dict, safe_serialization=True,
                                     text_encoder_lora_adapter_metadata=trained.peft_config[ADAPTER].to_dict())  # fmt: skip

    # 2. Loaded through the pipeline's `load_lora_weights`: the text encoder now matches the trained copy
    pipe.load_lora_weights(tmp_path, adapter_name=ADAPTER)
    torch.testing.assert_close(_encode(pipe), expected_embeds, atol=1e-5, rtol=1e-5)
    lora_images = _call(pipe)
    assert np.abs(lora_images - base_images).max() > 1e-4
    assert pipe.get_list_adapters() == {"text_encoder": [ADAPTER]}

    # 3. transformers' adapter API on the text encoder (what raises when peft is below transformers' floor)
    assert pipe.text_encoder.active_adapters() == [ADAPTER]
    assert set(pipe.text_encoder.get_adapter_state_dict(ADAPTER)) == set(state_dict)
    pipe.text_encoder.disable_adapters()
    torch.testing.assert_close(_encode(pipe), base_embeds, atol=0, rtol=0)
    pipe.text_encoder.enable_adapters()
    pipe.text_encoder.set_adapter(ADAPTER)
    torch.testing.assert_close(_encode(pipe), expected_embeds, atol=1e-5, rtol=1e-5)

    # 4. diffusers' pipeline-level switches, then unloading restores the base model exactly
    pipe.set_adapters(ADAPTER, adapter_weights=0.0)
    torch.testing.assert_close(_encode(pipe), base_embeds, atol=1e-6, rtol=0)
    pipe.set_adapters(ADAPTER, adapter_weights=1.0)
    np.testing.assert_allclose(_call(pipe), lora_images, atol=1e-6)
    pipe.unload_lora_weights()
    assert not hasattr(pipe.text_encoder, "peft_config") or not pipe.text_encoder.peft_config
    np.testing.assert_array_equal(_call(pipe), base_images)


def test_peft_below_transformers_floor_fails_with_a_clear_error(monkeypatch):
    """What a transformers >= 5.24 with peft 0.21 does: transformers' adapter API refuses, naming the peft it needs."""
    needed = Version(version("peft")).release[:2]
    needed = f"{needed[0]}.{needed[1] + 1}.0"  # the next minor peft release, not yet installed
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", needed)
    text_encoder = get_dummy_components()["text_encoder"]
    with pytest.raises(ValueError, match=rf"version of PEFT .* not compatible.*>= {needed.replace('.', '[.]')}"):
        text_encoder.add_adapter(LoraConfig(r=2, target_modules=TEXT_ENCODER_TARGETS), adapter_name=ADAPTER)
