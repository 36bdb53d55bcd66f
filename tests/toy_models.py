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


class ConstantX0(torch.nn.Module):
    """A `"sample"`-prediction network that always answers `x0_star`: the exact denoiser of a one-point data set."""

    def __init__(self, x0_star: torch.Tensor, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("x0_star", x0_star)
        self.drop = torch.nn.Dropout(dropout)
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    @property
    def dtype(self):
        return torch.float32

    def forward(self, sample, timestep, encoder_hidden_states, cross_attention_kwargs=None):
        return SimpleNamespace(sample=self.scale * self.drop(self.x0_star.expand_as(sample) + 0 * sample))
