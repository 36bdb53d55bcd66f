import os


# No network anywhere in the tests: set before diffusers / transformers / huggingface_hub are imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


# Tiny models: one thread is several times faster than two (thread start-up dominates on 2 shared cores).
torch.set_num_threads(1)


@pytest.fixture
def dummy_components():
    from diffusers_onestep.testing_utils import get_dummy_components

    return get_dummy_components()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny teacher saved as a real `StableDiffusionPipeline` directory (what `--pretrained_teacher...` points at)."""
    from diffusers import StableDiffusionPipeline

    from diffusers_onestep.testing_utils import get_dummy_teacher_components

    path = tmp_path_factory.mktemp("tiny-teacher")
    StableDiffusionPipeline(**get_dummy_teacher_components()).save_pretrained(path, safe_serialization=True)
    return str(path)
