"""Hand-checkable stand-ins for denoising networks, shared by the loss tests."""

from types import SimpleNamespace

import torch


class ToyUNet(torch.nn.Module):
    """`out = c * x_t + d * mean(encoder_hidden_states)`: every loss term can be written out by hand."""

    def __init__(self, c: float, d: float):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(c))
        self.d = torch.nn.Parameter(torch.tensor(d))

    @property
    def dtype(self):
        return torch.float32

    def forward(self, sample, timestep, encoder_hidden_states, cross_attention_kwargs=None):
        offset = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.c * sample + self.d * offset)
