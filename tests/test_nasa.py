import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0

from diffusers_onestep import NASAAttnProcessor, nasa_attention
from diffusers_onestep.testing_utils import get_dummy_components


HEADS, HEAD_DIM = 2, 4


@pytest.fixture
def attn():
    torch.manual_seed(0)
    return Attention(query_dim=8, cross_attention_dim=6, heads=HEADS, dim_head=HEAD_DIM, bias=True).eval()


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 5, 8, generator=g), torch.randn(3, 7, 6, generator=g), torch.randn(3, 4, 6, generator=g)


def hand_attention(attn, x, context, bias=None):
    """softmax(Q K^T / sqrt(d) + bias) V per head, merged back to (B, L, heads * d), written out by hand."""
    b = x.shape[0]
    q = attn.to_q(x).view(b, -1, HEADS, HEAD_DIM).transpose(1, 2)
    k = attn.to_k(context).view(b, -1, HEADS, HEAD_DIM).transpose(1, 2)
    v = attn.to_v(context).view(b, -1, HEADS, HEAD_DIM).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / HEAD_DIM**0.5
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, HEADS * HEAD_DIM)


@torch.no_grad()
def test_scale_zero_and_no_negative_equal_stock_processor(attn, tensors):
    x, c, n = tensors
    stock = AttnProcessor2_0()(attn, x, c)
    torch.testing.assert_close(
        NASAAttnProcessor(0.0)(attn, x, c, negative_encoder_hidden_states=n), stock, rtol=0, atol=0
    )
    torch.testing.assert_close(NASAAttnProcessor(0.5)(attn, x, c), stock, rtol=0, atol=0)
    # self-attention passes through even with a negative bound
    self_attn = Attention(query_dim=8, heads=HEADS, dim_head=HEAD_DIM).eval()
    torch.testing.assert_close(
        NASAAttnProcessor(0.5, negative_encoder_hidden_states=n)(self_attn, x),
        AttnProcessor2_0()(self_attn, x),
        rtol=0,
        atol=0,
    )


@torch.no_grad()
@pytest.mark.parametrize("alpha", [0.1, 0.7, 1.5])
def test_matches_hand_computed_z_plus_minus_alpha_z_minus(attn, tensors, alpha):
    x, c, n = tensors
    expected = attn.to_out[0](hand_attention(attn, x, c) - alpha * hand_attention(attn, x, n))
    got = NASAAttnProcessor(alpha)(attn, x, c, negative_encoder_hidden_states=n)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # per-call scale overrides the constructor's
    got = NASAAttnProcessor(0.0)(attn, x, c, negative_encoder_hidden_states=n, nasa_scale=alpha)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_per_sample_negatives_and_scales(attn, tensors):
    x, c, n = tensors
    alphas = torch.tensor([0.0, 0.3, 1.0])
    got = NASAAttnProcessor(alphas)(attn, x, c, negative_encoder_hidden_states=n)
    for i in range(3):
        single = NASAAttnProcessor(float(alphas[i]))(
            attn, x[i : i + 1], c[i : i + 1], negative_encoder_hidden_states=n[i : i + 1]
        )
        torch.testing.assert_close(got[i : i + 1], single, rtol=1e-5, atol=1e-6)
    # one negative broadcasts over the batch; a wrong batch size is refused
    broadcast = NASAAttnProcessor(0.4)(attn, x, c, negative_encoder_hidden_states=n[:1])
    torch.testing.assert_close(
        broadcast, NASAAttnProcessor(0.4)(attn, x, c, negative_encoder_hidden_states=n[:1].expand(3, -1, -1))
    )
    with pytest.raises(ValueError, match="negative_encoder_hidden_states"):
        NASAAttnProcessor(0.4)(attn, x, c, negative_encoder_hidden_states=n[:2])


@torch.no_grad()
def test_separate_masks_for_positive_and_negative(attn, tensors):
    x, c, n = tensors
    neg_keep = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    pos_bias = torch.zeros(3, 1, 7)
    pos_bias[:, :, 5:] = -10000.0
    neg_bias = (1.0 - neg_keep.float()) * -10000.0
    expected = attn.to_out[0](hand_attention(attn, x, c, pos_bias[:, 0]) - 0.5 * hand_attention(attn, x, n, neg_bias))
    got = NASAAttnProcessor(0.5)(
        attn, x, c, attention_mask=pos_bias, negative_encoder_hidden_states=n, negative_attention_mask=neg_keep
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # masking the negative's padding is equivalent to dropping those tokens
    got_short = NASAAttnProcessor(0.5)(
        attn, x[:1], c[:1], attention_mask=pos_bias[:1], negative_encoder_hidden_states=n[:1, :2]
    )
    torch.testing.assert_close(got[:1], got_short, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_wraps_foreign_processor_exactly(attn, tensors):
    """Around another processor NASA subtracts W_out Z-; identical to the fused form for a stock base."""
    x, c, n = tensors

    class Foreign(AttnProcessor2_0):
        pass

    fused = NASAAttnProcessor(0.6)(attn, x, c, negative_encoder_hidden_states=n)
    wrapped = NASAAttnProcessor(0.6, base_processor=Foreign())(attn, x, c, negative_encoder_hidden_states=n)
    torch.testing.assert_close(wrapped, fused, rtol=1e-5, atol=1e-6)
    classic = NASAAttnProcessor(0.6, base_processor=AttnProcessor())(attn, x, c, negative_encoder_hidden_states=n)
    torch.testing.assert_close(classic, fused, rtol=1e-5, atol=1e-6)


def test_invalid_scale_is_refused():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            NASAAttnProcessor(bad)


@torch.no_grad()
def test_context_manager_installs_on_cross_attention_and_restores():
    unet = get_dummy_components()["unet"]
    before = dict(unet.attn_processors)
    latents, embeds, negative = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    plain = unet(latents, 10, embeds).sample
    with nasa_attention(unet, negative, scale=0.5):
        installed = unet.attn_processors
        for name, processor in installed.items():
            if ".attn2." in name:
                assert isinstance(processor, NASAAttnProcessor) and processor.base_processor is before[name]
            else:
                assert processor is before[name]
        steered = unet(latents, 10, embeds).sample
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    assert (steered - plain).abs().max() > 1e-4
    with nasa_attention(unet, negative, scale=0.0):
        assert all(unet.attn_processors[k] is v for k, v in before.items())
    # restored even when the block raises
    with pytest.raises(RuntimeError):
        with nasa_attention(unet, negative, scale=0.5):
            raise RuntimeError("boom")
    assert all(unet.attn_processors[k] is v for k, v in before.items())


@torch.no_grad()
def test_context_manager_keeps_ip_adapter_processors():
    """A custom cross-attention processor (IP-Adapter) is wrapped, not dropped."""
    unet = get_dummy_components()["unet"]
    procs = {}
    for name, proc in unet.attn_processors.items():
        if ".attn2." in name:
            hidden = unet.config.block_out_channels[-1]
            procs[name] = IPAdapterAttnProcessor2_0(
                hidden_size=hidden, cross_attention_dim=32, num_tokens=(2,), scale=0.0
            )
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    with nasa_attention(unet, torch.randn(1, 16, 32), scale=0.3):
        for name, proc in unet.attn_processors.items():
            if ".attn2." in name:
                assert isinstance(proc.base_processor, IPAdapterAttnProcessor2_0)
    assert all(unet.attn_processors[k] is v for k, v in procs.items())


# ---------------------------------------------------------------- NAG (Normalized Attention Guidance) and the relation


def test_nag_combine_by_hand_with_the_l1_norm_clipping_and_blend():
    from diffusers_onestep.attention import NAGGuidance

    z_pos = torch.tensor([[[1.0, -2.0, 0.5], [0.1, 0.1, 0.1]]])
    z_neg = torch.tensor([[[0.0, 1.0, 0.5], [0.1, 0.1, 0.1]]])
    phi, tau, alpha = 2.0, 1.5, 0.6
    got = NAGGuidance(scale=phi, tau=tau, alpha=alpha).combine(z_pos, z_neg)
    # token 0: Z~ = (1 + 2*1, -2 + 2*(-3), 0.5 + 0) = (3, -8, 0.5); |Z~|_1 = 11.5, |Z+|_1 = 3.5, R = 23/7 > 1.5
    # Z^ = Z~ * 1.5 / R = Z~ * 10.5 / 23; Z = 0.6 Z^ + 0.4 Z+
    token0 = 0.6 * torch.tensor([3.0, -8.0, 0.5]) * 10.5 / 23 + 0.4 * torch.tensor([1.0, -2.0, 0.5])
    # token 1: Z+ = Z-, so Z~ = Z+, R = 1 <= tau: unchanged
    torch.testing.assert_close(got[0, 0], token0)
    torch.testing.assert_close(got[0, 1], z_pos[0, 1])
    # the official Flux code's L2 norm: R = |(3, -8, 0.5)|_2 / |(1, -2, 0.5)|_2
    l2 = NAGGuidance(scale=phi, tau=tau, alpha=alpha, norm_p=2).combine(z_pos, z_neg)
    ratio = torch.tensor([3.0, -8.0, 0.5]).norm() / torch.tensor([1.0, -2.0, 0.5]).norm()
    torch.testing.assert_close(l2[0, 0], 0.6 * torch.tensor([3.0, -8.0, 0.5]) * tau / ratio + 0.4 * z_pos[0, 0])


def test_nasa_is_a_shrunk_unclipped_nag_extrapolation():
    from diffusers_onestep.attention import NAGGuidance, NASAGuidance, nasa_as_nag_extrapolation

    z_pos, z_neg = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for a in (0.1, 0.5, 0.8):
        phi, shrink = nasa_as_nag_extrapolation(a)
        # NAG with no clipping (tau huge) and no blend (alpha 1) is the bare extrapolation (1 + phi) Z+ - phi Z-
        extrapolation = NAGGuidance(scale=phi, tau=1e9, alpha=1.0).combine(z_pos, z_neg)
        torch.testing.assert_close(NASAGuidance(scale=a).combine(z_pos, z_neg), shrink * extrapolation)


@torch.no_grad()
def test_nag_processor_on_one_cross_attention_layer_by_hand(attn, tensors):
    from diffusers_onestep.attention import NAGGuidance, NegativeAttnProcessor

    x, c, n = tensors
    guidance = NAGGuidance(scale=3.0, tau=1.2, alpha=0.5)
    got = NegativeAttnProcessor(guidance)(attn, x, c, negative_encoder_hidden_states=n)
    z = guidance.combine(hand_attention(attn, x, c), hand_attention(attn, x, n))
    torch.testing.assert_close(got, attn.to_out[0](z), rtol=1e-5, atol=1e-6)
    # around a foreign processor (any other class): its output plus W_out (Z_NAG - Z+)
    class Foreign(AttnProcessor2_0):
        pass

    wrapped = NegativeAttnProcessor(guidance, base_processor=Foreign())(attn, x, c, negative_encoder_hidden_states=n)
    torch.testing.assert_close(wrapped, got, rtol=1e-5, atol=1e-6)
