"""Dequantization of every supported GGML type against gguf's own numpy reference."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from talkloop.engine.errors import ModelLoadError, UnsupportedModelError
from talkloop.engine.weights.dequant import dequantize, quantized_tensor

Q = GGMLQuantizationType

# byte offsets of the fp16 scale fields inside one block
F16_FIELDS = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q4_1: (0, 2),
    Q.Q5_0: (0,),
    Q.Q5_1: (0, 2),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}


def _random_raw(qtype: GGMLQuantizationType, num_rows: int, blocks_per_row: int) -> np.ndarray:
    """uint8 [num_rows, bytes_per_row] of random blocks whose fp16 fields are finite."""
    rng = np.random.default_rng(int(qtype))
    _, type_size = GGML_QUANT_SIZES[qtype]
    num_blocks = num_rows * blocks_per_row
    if qtype == Q.F32:
        raw = rng.standard_normal(num_blocks, dtype=np.float32).view(np.uint8)
    elif qtype == Q.F16:
        raw = rng.standard_normal(num_blocks).astype(np.float16).view(np.uint8)
    elif qtype == Q.BF16:
        raw = rng.standard_normal(num_blocks, dtype=np.float32).view(np.uint8)
        raw = raw.reshape(-1, 4)[:, 2:].copy()  # the high half of each f32, little-endian
    else:
        raw = rng.integers(0, 256, size=(num_blocks, type_size), dtype=np.uint8)
        for offset in F16_FIELDS[qtype]:
            scales = rng.uniform(-2, 2, size=num_blocks).astype(np.float16)
            raw[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return raw.reshape(num_rows, -1)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, *F16_FIELDS], ids=lambda q: q.name)
def test_matches_gguf_numpy_reference(qtype: GGMLQuantizationType) -> None:
    block_size, _ = GGML_QUANT_SIZES[qtype]
    num_rows, blocks_per_row = 3, 5
    raw = _random_raw(qtype, num_rows, blocks_per_row)
    shape = (num_rows, blocks_per_row * block_size)

    got = dequantize(raw, qtype, shape)
    expected = torch.from_numpy(np.asarray(quants.dequantize(raw, qtype), dtype=np.float32))

    assert got.dtype == torch.float32
    assert got.shape == shape
    torch.testing.assert_close(got, expected.reshape(shape), rtol=0, atol=0)


def test_accepts_torch_bytes_and_3d_shapes() -> None:
    raw = _random_raw(Q.Q8_0, 4, 2)
    expected = dequantize(raw, Q.Q8_0, (4, 64))
    got = dequantize(torch.from_numpy(raw.copy()), Q.Q8_0, (2, 2, 64))
    torch.testing.assert_close(got, expected.reshape(2, 2, 64), rtol=0, atol=0)


def test_quantized_tensor_keeps_one_row_of_blocks_per_logical_row() -> None:
    raw = _random_raw(Q.Q4_1, 6, 3)
    qt = quantized_tensor("w", Q.Q4_1, (6, 96), raw)
    assert qt.data.shape == (6, 3 * 20)
    assert qt.data.dtype == torch.uint8
    assert qt.num_bytes == raw.nbytes


def test_unsupported_type_names_the_type_and_the_tensor() -> None:
    raw = np.zeros((2, 110), dtype=np.uint8)
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.attn_q\.weight.*IQ4_XS"):
        dequantize(raw, Q.IQ4_XS, (2, 256), name="blk.0.attn_q.weight")


def test_unknown_type_id_is_unsupported() -> None:
    with pytest.raises(UnsupportedModelError, match=r"'x'.*type id 999"):
        dequantize(np.zeros(4, dtype=np.uint8), 999, (1,), name="x")


def test_wrong_byte_count_names_the_tensor() -> None:
    raw = np.zeros((2, 33), dtype=np.uint8)
    with pytest.raises(ModelLoadError, match=r"'w'.*needs 68 bytes.*66"):
        dequantize(raw, Q.Q8_0, (2, 32), name="w")


def test_row_not_a_multiple_of_the_block_names_the_tensor() -> None:
    with pytest.raises(ModelLoadError, match=r"'w'.*row length 48.*Q4_0 block size 32"):
        dequantize(np.zeros(27, dtype=np.uint8), Q.Q4_0, (1, 48), name="w")
