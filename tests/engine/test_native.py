"""The native decode-attention kernel: equal to the PyTorch path, log-sum-exp exact, the same
engine output, and a clean fallback when it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from talkloop.engine import native
from talkloop.engine.attention import AttentionMetadata, _decode_attention
from tests.engine.tiny import (
    greedy,
    reference_greedy,
    run_to_completion,
    tiny_config,
    tiny_engine,
    tiny_model,
)

needs_kernel = pytest.mark.skipif(
    native.library() is None, reason="no C++ compiler: the PyTorch path is tested alone"
)


def _case(
    dtype: torch.dtype,
    lens: list[int],
    block_size: int = 4,
    seed: int = 0,
    dim: int = 8,
    group: int = 3,
):
    torch.manual_seed(seed)
    kv_heads, num_blocks = 2, 64
    caches = [torch.randn(kv_heads, num_blocks, block_size, dim, dtype=dtype) for _ in "kv"]
    width = max(-(-n // block_size) for n in lens)
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in lens])
    lens_t = torch.tensor(lens)
    beyond = torch.arange(width * block_size).unsqueeze(0) >= lens_t.unsqueeze(1)
    bias = torch.zeros(beyond.shape).masked_fill_(beyond, float("-inf"))
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), (), 0, tables, lens_t, bias)
    q = torch.randn(len(lens), kv_heads * group, dim, dtype=dtype)
    return q, caches[0], caches[1], meta


@needs_kernel
@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["f32", "bf16"]
)
@pytest.mark.parametrize(
    ("dim", "group", "block_size"),
    [(8, 3, 4), (64, 3, 16), (64, 4, 5), (128, 2, 16)],  # 64/128: the AVX-512 path
)
def test_kernel_equals_the_pytorch_path(
    dtype: torch.dtype, tolerance: float, dim: int, group: int, block_size: int
) -> None:
    # partial and single blocks; 16, 17, 33 and 64 keys: whole and partial lanes of 16
    lens = [1, 5, 16, 17, 33, 37, 64, 4]
    q, keys, values, meta = _case(dtype, lens, block_size, dim=dim, group=group)
    expected = _decode_attention(q, keys, values, meta, 0.35)
    got = native.decode_attention(q, keys, values, meta.decode_block_tables,
                                  meta.decode_context_lens, 0.35)  # fmt: skip
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


@needs_kernel
@pytest.mark.parametrize("dim", [8, 64])
def test_log_sum_exp_of_the_scaled_scores(dim: int) -> None:
    q, keys, values, meta = _case(torch.float32, [3, 9, 40], dim=dim)
    out, lse = native.decode_attention_lse(
        q, keys, values, meta.decode_block_tables, meta.decode_context_lens, 0.5
    )
    for row, length in enumerate([3, 9, 40]):
        for head in range(q.shape[1]):
            kv = head // 3
            k = keys[kv][meta.decode_block_tables[row]].reshape(-1, keys.shape[-1])[:length]
            scores = (k @ q[row, head]) * 0.5
            assert lse[row, head].item() == pytest.approx(torch.logsumexp(scores, 0).item(), 1e-5)
    plain = native.decode_attention(q, keys, values, meta.decode_block_tables,
                                    meta.decode_context_lens, 0.5)  # fmt: skip
    torch.testing.assert_close(out, plain)


@needs_kernel
def test_engine_output_is_the_same_with_the_kernel_or_without() -> None:
    model = tiny_model(tiny_config("llama"), seed=8)
    prompts = [[*range(40, 80), 100 + i] for i in range(4)] + [[7, 8, 9]]
    outputs = []
    for use_kernel in (True, False):
        engine = tiny_engine(model, num_blocks=128, block_size=4, max_num_batched_tokens=64)
        engine.runner.native_decode = use_kernel
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, greedy(max_tokens=12, ignore_eos=True))
        outputs.append(run_to_completion(engine))
    assert outputs[0] == outputs[1]
    assert outputs[0]["r4:0"] == reference_greedy(model, [7, 8, 9], 12)


def test_disabled_or_unbuildable_kernels_fall_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path
) -> None:
    native.library.cache_clear()
    try:
        monkeypatch.setenv(native.ENABLE_ENV, "0")
        assert native.library() is None
        assert not native.decode_attention_supported(torch.device("cpu"), torch.float32, 64)
        native.library.cache_clear()
        monkeypatch.delenv(native.ENABLE_ENV)
        monkeypatch.setenv("TALKLOOP_CACHE_DIR", str(tmp_path))
        monkeypatch.setattr(native.shutil, "which", lambda name: None)
        with caplog.at_level(logging.WARNING, logger="talkloop.engine.native"):
            assert native.library() is None
        assert "no C++ compiler found" in caplog.text
    finally:
        native.library.cache_clear()


def _without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "library", lambda: None)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("with_outliers", [False, True])
def test_int8_passes_equal_the_pytorch_path(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, with_outliers: bool
) -> None:
    g = torch.Generator().manual_seed(3)
    rows, cols, out_features = 37, 300, 70  # neither a multiple of the kernels' tiles
    x = (torch.randn(rows, cols, generator=g) * 3).to(dtype)
    x[5] = 0  # an all-zero row: scale 0, no division by zero
    x[:, 17] *= 40  # a massive channel
    weight = torch.randn(out_features, cols, generator=g)
    outliers = native.OutlierChannels.of(weight, torch.tensor([17, 250])) if with_outliers else None
    acc = torch.randint(-(2**20), 2**20, (rows, out_features), dtype=torch.int32, generator=g)
    col_scales = torch.rand(out_features, generator=g) / 100
    bias = torch.randn(out_features, generator=g).to(dtype)

    q, scales, values = native.quantize_rows(x, outliers)
    y = native.dequantize(acc, scales, col_scales, bias, dtype, outliers, values)
    _without_kernels(monkeypatch)
    q_ref, scales_ref, values_ref = native.quantize_rows(x, outliers)
    y_ref = native.dequantize(acc, scales_ref, col_scales, bias, dtype, outliers, values_ref)

    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    assert (q.int() - q_ref.int()).abs().max() <= 1  # x * (127 / amax): last-ulp rounding ties
    torch.testing.assert_close(scales, scales_ref)
    assert scales[5] == 0 and (q[5] == 0).all()
    if with_outliers:
        assert values is not None and values_ref is not None
        torch.testing.assert_close(values, values_ref)
        assert (q[:, [17, 250]] == 0).all()
        assert scales.max() < x.float().abs().amax() / 127 / 4  # channel 17 no longer sets it
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), y_ref.float(), atol=tolerance, rtol=tolerance)
    assert y.dtype == dtype and y.shape == (rows, out_features)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_rms_norm_equals_the_pytorch_order_of_operations(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 7, 200, generator=g) * 3).to(dtype)  # any leading shape, odd width
    weight = (torch.rand(200, generator=g) + 0.5).to(dtype)
    expected = weight * torch.nn.functional.rms_norm(x.float(), (200,), eps=1e-5).to(dtype)
    got = native.rms_norm(x, weight, 1e-5)
    assert got is not None and got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-6, rtol=1e-6)
    assert native.rms_norm(x.transpose(0, 1), weight, 1e-5) is None  # not contiguous: fallback
    trained = weight.float().requires_grad_()
    assert native.rms_norm(x.float(), trained, 1e-5) is None  # autograd: the PyTorch path


@needs_kernel
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 49152])
def test_argmax_kernel_picks_what_torch_picks(cols: int) -> None:
    torch.manual_seed(cols)
    wide = torch.randn(9, cols + 5)
    x = wide[:, :cols]  # a row stride wider than the row
    x[1] = 0.0  # all tied: the first index
    x[2, cols // 2 :] = float("nan")  # NaN counts as the maximum, the first one wins
    x[3] = float("-inf")
    x[4, -1] = float("inf")
    x[5, :: max(1, cols // 3)] = 7.0  # ties for the maximum in several 16-lane blocks
    x[6] = float("nan")
    assert torch.equal(native.argmax_rows(x), x.argmax(dim=-1))
    assert native.argmax_rows(x[:0]).shape == (0,)


needs_int4 = pytest.mark.skipif(
    not native.int4_supported(), reason="no AVX-512 VNNI or AVX2: int4 layers use torch's kernel"
)


def _int4_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor):
    """What the kernel computes: activations quantized per group of 32 to int8 (in float32,
    round half to even, as the kernel rounds), times q * scale, plus min times each group's
    sum (accumulated in float64)."""
    rows, cols = x.shape
    xg = x.float().view(rows, cols // 32, 32)
    amax = xg.abs().amax(dim=-1, keepdim=True)
    # NOTE: a true division (`127 / amax` would be a reciprocal times 127: other roundings).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = (xg * inv).clamp(-127, 127).round()
    xd = (xq.double() * (amax / 127).double()).view(rows, cols)
    xg = xg.double()
    scaled = q.double() * scale.double().repeat_interleave(32, dim=1)
    return xd @ scaled.t() + xg.sum(dim=-1) @ low.double().t()


@needs_int4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 8, 13])  # 13: two calls of at most 8 rows
def test_int4_kernel_equals_its_reference(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    out_features, cols = 48, 96
    weight = torch.randn(out_features, cols, generator=g) * 0.1
    weight[3, :32] = 0.25  # a constant group: scale 0, every value exact
    q, scale, low = native.int4_quantize(weight)
    assert q.max() <= 15 and scale.dtype == torch.float16 and low.dtype == torch.float16
    dequantized = q.float() * scale.float().repeat_interleave(32, 1)
    dequantized += low.float().repeat_interleave(32, 1)
    assert (dequantized - weight).abs().max() <= scale.float().max() / 2 + 1e-3
    assert (dequantized[3, :32] == 0.25).all()
    x = (torch.randn(rows, cols, generator=g) * 2).to(dtype)
    x[0, 32:64] = 0  # an all-zero group: scale 0, no division by zero
    bias = torch.randn(out_features, generator=g).to(dtype)
    packed = native.int4_pack(q, scale, low)
    assert packed.shape == (out_features // 16, cols // 32, 320)
    expected = _int4_reference(x.float(), q, scale, low)
    got = native.int4_linear(x, packed)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=tolerance)
    with_bias = native.int4_linear(x, packed, bias)  # rounded to dtype, then the bias added
    torch.testing.assert_close(with_bias, (got + bias).to(dtype), atol=0, rtol=0)


@needs_int4
def test_int4_kernel_takes_zero_rows() -> None:
    """A step whose chunks turn no row into logits calls lm_head on 0 rows (this once killed
    the server with SIGFPE: a division by the number of row blocks)."""
    q, scale, low = native.int4_quantize(torch.randn(32, 64))
    packed = native.int4_pack(q, scale, low)
    assert native.int4_linear(torch.empty(0, 64), packed).shape == (0, 32)
    lib = native.library()
    assert lib is not None
    out = torch.empty(0, 32)
    x = torch.empty(0, 64)  # the kernel itself returns at once too
    lib.talkloop_int4_linear_f32(x.data_ptr(), 0, 64, packed.data_ptr(), 32, None, out.data_ptr())


@needs_int4
def test_int4_layers_read_a_q4_1_checkpoint_exactly() -> None:
    """A weight that already is Q4_1 (q * scale + min, fp16 scale and min, each group
    spanning 0..15) comes back unchanged."""
    g = torch.Generator().manual_seed(9)
    q = torch.randint(0, 16, (32, 64), generator=g)
    q[:, ::32] = 0  # each group holds both 0 and 15
    q[:, 1::32] = 15
    scale = (torch.rand(32, 2, generator=g) / 50 + 1e-3).half()
    low = (-torch.rand(32, 2, generator=g) / 10).half()
    weight = q.float() * scale.float().repeat_interleave(32, 1)
    weight += low.float().repeat_interleave(32, 1)
    got_q, got_scale, got_low = native.int4_quantize(weight)
    assert torch.equal(got_q, q.to(torch.uint8))
    assert torch.equal(got_scale, scale) and torch.equal(got_low, low)


# ---- bf16 prefill attention (prefill_attention.cpp) ------------------------------------------
needs_bf16_prefill = pytest.mark.skipif(
    not native.prefill_attention_supported(torch.device("cpu"), torch.bfloat16, 64),
    reason="no AVX-512 BF16: prefills use SDPA",
)


def _exact_prefill(q, keys, values, table, context_len, scale) -> torch.Tensor:
    """Causal attention of q [n, H, D] (the last n positions) in float64 from the blocks."""
    kv_heads, _, _, dim = keys.shape
    group = q.shape[1] // kv_heads
    k = keys[:, table].reshape(kv_heads, -1, dim)[:, :context_len].double()
    v = values[:, table].reshape(kv_heads, -1, dim)[:, :context_len].double()
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    scores = torch.einsum("nhd,hkd->hnk", q.double(), k) * scale
    cached = context_len - q.shape[0]
    visible = torch.arange(context_len)[None, :] <= torch.arange(q.shape[0])[:, None] + cached
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnk,hkd->nhd", probs, v)


@needs_bf16_prefill
@pytest.mark.parametrize(
    ("dim", "group", "block_size"), [(64, 3, 16), (64, 1, 5), (128, 4, 16), (64, 2, 1)]
)
@pytest.mark.parametrize(
    ("cached", "new"),
    # one token; tiles of 32 keys whole and partial; query blocks of 16 whole and partial;
    # more cached than new (the chunk after a long history) and a long prompt
    [(0, 1), (0, 47), (5, 3), (31, 33), (64, 64), (100, 17), (300, 5), (16, 400)],
)
def test_prefill_kernel_equals_exact_attention(
    dim: int, group: int, block_size: int, cached: int, new: int
) -> None:
    torch.manual_seed(cached * 1000 + new)
    kv_heads, length = 2, cached + new
    width = -(-length // block_size)
    num_blocks = width + 7
    keys, values = (torch.randn(kv_heads, num_blocks, block_size, dim).bfloat16() for _ in "kv")
    table = torch.randperm(num_blocks)[:width]
    # q as the model passes it: a slice of the fused q/k heads (rows strided, heads dense)
    fused = (torch.randn(new, kv_heads * (group + 1), dim) * 2).bfloat16()
    q = fused[:, : kv_heads * group]
    out = torch.full((new, kv_heads * group, dim), float("nan"), dtype=torch.bfloat16)
    native.prefill_attention(out, q, keys, values, table, length, dim**-0.5)
    expected = _exact_prefill(q, keys, values, table, length, dim**-0.5)
    # bf16 output and bf16 probabilities in the value sum: ~1e-2 at this scale (values ~ 1)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


@needs_bf16_prefill
def test_prefill_kernel_refuses_what_it_cannot_serve() -> None:
    keys = torch.zeros(1, 4, 16, 64, dtype=torch.bfloat16)
    q = torch.zeros(10, 2, 64, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    table = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="do not fit 2 blocks of 16"):
        native.prefill_attention(out, q, keys, keys, table, 40, 0.125)
    with pytest.raises(ValueError, match="bfloat16"):
        native.prefill_attention(out, q.float(), keys, keys, table, 20, 0.125)
    assert not native.prefill_attention_supported(torch.device("cpu"), torch.float32, 64)
    assert not native.prefill_attention_supported(torch.device("cpu"), torch.bfloat16, 48)


@needs_bf16_prefill
def test_engine_with_the_prefill_kernel_matches_sdpa() -> None:
    """A bf16 model with head_dim 64: logits of whole and chunked prefills (after a cached
    prefix) agree with the SDPA path, and greedy decoding gives the same tokens."""
    config = tiny_config("llama", hidden_size=128, num_heads=2, num_kv_heads=1, head_dim=64)
    model = tiny_model(config, seed=3, dtype=torch.bfloat16)
    prompts = [[*range(40, 110), 120 + i] for i in range(3)] + [list(range(200, 237))]
    outputs = []
    for use_kernel in (True, False):
        engine = tiny_engine(model, num_blocks=96, block_size=4, max_num_batched_tokens=24)
        assert engine.runner.native_prefill  # the kernel is built here
        engine.runner.native_prefill = use_kernel
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, greedy(max_tokens=10, ignore_eos=True))
        outputs.append(run_to_completion(engine))
    assert outputs[0] == outputs[1]
