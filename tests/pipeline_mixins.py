"""Generic pipeline checks shared by the pipeline test classes (diffusers' `PipelineTesterMixin`, reduced).

A test class sets `get_pipeline()` (a fresh pipeline from tiny components) and `get_inputs(seed)` (call kwargs with
`output_type="np"` and a generator); every check below then runs for it.
"""

import numpy as np
import torch


class PipelineChecksMixin:
    def get_pipeline(self):
        raise NotImplementedError

    def get_inputs(self, seed=0):
        raise NotImplementedError

    @staticmethod
    def images_of(output):
        return np.asarray(output.images if hasattr(output, "images") else output[0])

    def test_same_generator_same_output(self):
        pipe = self.get_pipeline()
        first = self.images_of(pipe(**self.get_inputs(seed=0)))
        second = self.images_of(pipe(**self.get_inputs(seed=0)))
        other = self.images_of(pipe(**self.get_inputs(seed=1)))
        np.testing.assert_array_equal(first, second)
        assert np.abs(first - other).max() > 1e-3

    def test_save_load_round_trip(self, tmp_path):
        pipe = self.get_pipeline()
        expected = self.images_of(pipe(**self.get_inputs()))
        pipe.save_pretrained(tmp_path)
        reloaded = type(pipe).from_pretrained(tmp_path)
        reloaded.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(self.images_of(reloaded(**self.get_inputs())), expected, atol=1e-6)

    def test_batch_equals_single(self):
        pipe = self.get_pipeline()
        inputs = self.get_inputs()
        prompts = [inputs["prompt"], "a photo of a dog"]
        generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
        batched = self.images_of(pipe(**{**inputs, "prompt": prompts, "generator": generators}))
        for i, prompt in enumerate(prompts):
            single = self.images_of(
                pipe(**{**inputs, "prompt": prompt, "generator": torch.Generator().manual_seed(i)})
            )
            np.testing.assert_allclose(batched[i], single[0], atol=1e-5)

    def test_num_images_per_prompt(self):
        pipe = self.get_pipeline()
        for n in (1, 3):
            images = self.images_of(pipe(**{**self.get_inputs(), "num_images_per_prompt": n}))
            assert images.shape[0] == n

    def test_return_dict_false(self):
        pipe = self.get_pipeline()
        as_dict = self.images_of(pipe(**self.get_inputs()))
        as_tuple = pipe(**{**self.get_inputs(), "return_dict": False})
        assert isinstance(as_tuple, tuple)
        np.testing.assert_array_equal(np.asarray(as_tuple[0]), as_dict)
