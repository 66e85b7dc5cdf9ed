"""Weight-only int8/int4 linears against the dense reference."""

from __future__ import annotations

import pytest
import torch

from talkloop.engine.models.linear import Linear, QuantizedLinear, quantize_linears
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
    # come back exactly, up to bf16 rounding of the activations and scales.
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (32, 64), generator=g).float()
    q[:, ::32] = 0  # every group spans the full 0..15 range, so min/max recover scale and min
    q[:, 1::32] = 15
    scale = torch.full((32, 2), 2.0**-6).repeat_interleave(32, dim=1)
    low = torch.full((32, 2), -0.125).repeat_interleave(32, dim=1)
    dense = Linear(32, 64, False, torch.float32)
    dense.weight.data = q * scale + low
    quant = QuantizedLinear(dense, 4, group_size=32, max_quant_rows=None)
    x = torch.randn(2, 64).bfloat16().float()
    torch.testing.assert_close(quant(x), dense(x), atol=2e-2, rtol=1e-2)


def test_large_batches_use_the_dense_weight_exactly() -> None:
    dense = _dense()
    quant = QuantizedLinear(dense, 4, group_size=32, max_quant_rows=8)
    x = torch.randn(9, 96)
    torch.testing.assert_close(quant(x), dense(x))


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
