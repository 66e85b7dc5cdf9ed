"""Weight-only int8/int4 linears against the dense reference."""

from __future__ import annotations

import pytest
import torch

from talkloop.engine import cpu
from talkloop.engine.models.linear import (
    Linear,
    QuantizedLinear,
    channel_ranges,
    quantize_linears,
)
from tests.engine.tiny import full_logits, tiny_config, tiny_model


def _dense(out_features: int = 64, in_features: int = 96, bias: bool = True) -> Linear:
    layer = Linear(out_features, in_features, bias, torch.float32)
    g = torch.Generator().manual_seed(0)
    layer.weight.data = torch.randn(out_features, in_features, generator=g) * 0.1
    if layer.bias is not None:
        layer.bias.data = torch.randn(out_features, generator=g)
    return layer


@pytest.mark.parametrize(("bits", "tolerance"), [(8, 0.01), (4, 0.12)])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_quantized_matches_dense(bits: int, tolerance: float, rows: int) -> None:
    dense = _dense()
    quant = QuantizedLinear(dense, bits, group_size=32, max_quant_rows=None)
    x = torch.randn(rows, 96)
    expected = dense(x)
    error = (quant(x) - expected).abs().max() / expected.abs().max()
    assert error < tolerance


def test_int4_is_exact_on_q4_1_style_weights() -> None:
    # Weights already of the form q * scale + min per group of 32 (as a Q4_1 GGUF stores them)
    # come back exactly, up to the kernel's rounding of the activations (bf16 for torch's
    # kernel; int8 per group of 32 for the native one, whose exact weights test_native checks).
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (32, 64), generator=g).float()
    q[:, ::32] = 0  # every group spans the full 0..15 range, so min/max recover scale and min
    q[:, 1::32] = 15
    scale = torch.full((32, 2), 2.0**-6).repeat_interleave(32, dim=1)
    low = torch.full((32, 2), -0.125).repeat_interleave(32, dim=1)
    dense = Linear(32, 64, False, torch.float32)
    dense.weight.data = q * scale + low
    quant = QuantizedLinear(dense, 4, group_size=32, max_quant_rows=None)
    x = torch.randn(2, 64, generator=g).bfloat16().float()
    tolerance = 4e-2 if quant.int4_packed is not None else 2e-2
    torch.testing.assert_close(quant(x), dense(x), atol=tolerance, rtol=1e-2)


@pytest.fixture(params=[True, False], ids=["vnni", "no-vnni"])
def int8_dot(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both CPU kinds on any machine: with int8 dot products (W8A8 for large batches) and
    without them (AVX2: no W8A8). Either path is correct anywhere, only its speed differs."""
    monkeypatch.setattr(cpu, "has_int8_dot", lambda: request.param)
    return bool(request.param)


@pytest.mark.parametrize("bits", [8, 4])
def test_large_batches_take_the_w8a8_path(bits: int, int8_dot: bool) -> None:
    dense = _dense()
    quant = QuantizedLinear(dense, bits, group_size=32, max_quant_rows=8)
    native_int4 = bits == 4 and quant.int4_packed is not None
    if native_int4 and not int8_dot:  # the int4 kernel takes every batch: no int8 copy
        assert quant.max_quant_rows is None and quant.int8_weight is None
        x = torch.randn(3, 50, 96)
        error = (quant(x) - dense(x)).abs().max() / dense(x).abs().max()
        assert 0 < error < 0.12
        return
    assert quant.int8_weight is not None
    if bits == 8:  # an int8 layer's W8A8 path shares its weight-only kernel's int8 weight
        assert quant.int8_weight.data_ptr() == quant.qweight.data_ptr()
    # Past max_quant_rows (8; 64 for a native int4 layer, whose kernel reuses weights across
    # rows), in any leading shape.
    rows = quant.max_quant_rows + 10
    assert rows == (74 if native_int4 else 18)
    x = torch.randn(2, rows // 2, 96)
    got = quant(x)
    expected = dense(x)
    assert got.shape == expected.shape
    error = (got - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.02  # int8 activations (W8A8) or weights: close, not the dense product
    # Each row is computed alone: its result does not depend on the rest of the batch.
    fewer = rows - 1  # still past max_quant_rows
    torch.testing.assert_close(quant(x.reshape(rows, 96)[:fewer]), got.reshape(rows, -1)[:fewer])


def test_without_int8_dot_large_batches_use_the_int8_weight_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No VNNI: past max_quant_rows an int8 layer is x @ (q * scale)^T in float32, exactly."""
    monkeypatch.setattr(cpu, "has_int8_dot", lambda: False)
    dense = _dense()
    quant = QuantizedLinear(dense, 8, max_quant_rows=8)
    assert quant.int8_weight is not None and quant.int8_scales is not None
    x = torch.randn(20, 96)
    weight = quant.int8_weight.float() * quant.int8_scales[:, None]
    assert dense.bias is not None
    torch.testing.assert_close(quant(x), x @ weight.t() + dense.bias)


def test_outlier_channels_keep_a_massive_channel_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "has_int8_dot", lambda: True)  # outliers serve W8A8 only
    dense = _dense(out_features=64, in_features=256, bias=False)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 256, generator=g) * 0.3
    x[:, 7] = 25.0  # one channel ~80x the rest, on every token
    expected = dense(x)
    ranges = x.abs().amax(dim=0)
    plain = QuantizedLinear(dense, 8, max_quant_rows=8)
    kept = QuantizedLinear(dense, 8, max_quant_rows=8, channel_range=ranges)
    assert kept.outliers is not None and 7 in kept.outliers.indices.tolist()
    error_plain = ((plain(x) - expected).norm() / expected.norm()).item()
    error_kept = ((kept(x) - expected).norm() / expected.norm()).item()
    assert error_kept < error_plain / 4, (error_kept, error_plain)


def test_channel_ranges_observe_every_linear_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "has_int8_dot", lambda: True)
    config = tiny_config("llama", hidden_size=64, intermediate_size=128)
    model = tiny_model(config, seed=2)
    tokens = list(range(20, 60))
    ranges = channel_ranges(model, lambda: model.compute_logits(model.prefill(tokens)))
    assert len(ranges) == 2 * 4 + 1
    assert ranges["layers.0.attn.qkv"].shape == (64,)
    assert ranges["layers.1.mlp.down"].shape == (128,)
    assert (ranges["lm_head"] > 0).all()
    # The hooks are gone: a second forward leaves the dict alone.
    model.prefill(tokens)
    assert quantize_linears(model, "int8", ranges=ranges) == 2 * 4 + 1
    assert model.layers[0].attn.qkv.outliers is not None


def test_quantized_model_logits_stay_close() -> None:
    config = tiny_config("llama", hidden_size=64, intermediate_size=128)
    reference = tiny_model(config, seed=2)
    model = tiny_model(config, seed=2)
    assert quantize_linears(model, "int8", max_quant_rows=None) == 2 * 4 + 1
    tokens = list(range(20, 60))
    expected = full_logits(reference, tokens)
    got = full_logits(model, tokens)
    # bf16 activations plus int8 weights: a few percent of error on average.
    assert ((got - expected).abs().mean() / expected.abs().mean()) < 0.06
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.8
