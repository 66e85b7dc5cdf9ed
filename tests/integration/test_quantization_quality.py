"""Quality guard: perplexity of the bundled model with int8/int4 weights vs fp32.

Held-out text: tests/data/heldout_chat.txt, written for talkloop (not taken from anywhere).
Targets: int8 within 2% and int4 within 6% of the fp32 dequantized model, for both of a
quantized layer's kernels: the decode-sized one (int8: torch's weight-only kernel; int4: the
native int4 x int8 VNNI kernel, activations quantized per group of 32, where it is built) and
W8A8 with calibrated outlier channels (prefill and batched decode; the engine as `load_model`
builds it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from talkloop.engine.config import DType, EngineConfig, Quantization
from talkloop.engine.loader import load_model
from talkloop.engine.models.linear import quantize_linears
from tests.engine.tiny import full_logits

pytestmark = pytest.mark.integration

TEXT = (Path(__file__).parents[1] / "data" / "heldout_chat.txt").read_text(encoding="utf-8")


def _perplexity(quantization: Quantization, dtype: DType, kernel: str = "w8a8") -> float:
    if kernel == "w8a8":  # 511 rows per call: every quantized layer takes the W8A8 path
        loaded = load_model(EngineConfig(dtype=dtype, quantization=quantization))
    else:  # the decode-sized kernels for every row, as decode-sized batches use them
        loaded = load_model(EngineConfig(dtype=dtype))
        quantize_linears(loaded.model, quantization, max_quant_rows=None)
    ids = loaded.tokenizer.encode(TEXT, add_special_tokens=False)[:512]
    with torch.inference_mode():
        logits = full_logits(loaded.model, ids)
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
    return float(nll.exp())


@pytest.fixture(scope="module")
def fp32_perplexity() -> float:
    return _perplexity("none", "float32")


@pytest.mark.parametrize("kernel", ["weight_only", "w8a8"])
@pytest.mark.parametrize(("quantization", "tolerance"), [("int8", 0.02), ("int4", 0.06)])
def test_quantized_perplexity_stays_close(
    fp32_perplexity: float, quantization: str, tolerance: float, kernel: str
) -> None:
    ppl = _perplexity(quantization, "bfloat16", kernel)  # type: ignore[arg-type]
    print(f"perplexity fp32 {fp32_perplexity:.3f} {quantization} {kernel} {ppl:.3f}")
    assert fp32_perplexity < 60  # sanity: the model reads this text as English
    assert ppl <= fp32_perplexity * (1 + tolerance), (quantization, ppl, fp32_perplexity)
