"""The native whole-model decode step: the same hidden states and cache writes as the modules,
the same engine output (speculative rows included), clear errors, and None where it cannot
serve."""

from __future__ import annotations

import pytest
import torch

from talkloop.engine import native
from talkloop.engine.attention import AttentionMetadata, KVCache
from talkloop.engine.config import SpeculativeConfig
from talkloop.engine.models.linear import quantize_linears
from talkloop.engine.sampling_params import SamplingParams
from tests.engine.tiny import (
    encode_bytes,
    run_to_completion,
    tiny_config,
    tiny_engine,
    tiny_model,
)

needs_kernel = pytest.mark.skipif(
    native.library() is None, reason="no C++ compiler: the PyTorch path is tested alone"
)

BLOCK = 4
NUM_BLOCKS = 32


def _model(kind: str, dtype: torch.dtype, quantization: str):
    model = tiny_model(tiny_config(kind, intermediate_size=128), dtype=dtype)
    quantize_linears(model, quantization)  # type: ignore[arg-type]
    return model


def _filled_cache(model, seed: int = 1) -> KVCache:
    c = model.config
    dtype = model.embed_tokens.dtype
    cache = KVCache(c.num_layers, NUM_BLOCKS, BLOCK, c.num_kv_heads, c.head_dim, dtype, "cpu")
    g = torch.Generator().manual_seed(seed)
    for pool in (*cache.keys, *cache.values):
        pool.copy_(torch.randn(pool.shape, generator=g).to(dtype))
    return cache


def _rows():
    """Three sequences: two single-token decodes and one sequence's three speculative rows."""
    tables = [[3, 7, 1, 0, 0], [9, 2, 0, 0, 0], [11, 12, 13, 14, 15]]
    rows = [(0, 10), (1, 5), (2, 17), (2, 18), (2, 19)]  # (sequence, position)
    positions = [p for _, p in rows]
    slots = [tables[s][p // BLOCK] * BLOCK + p % BLOCK for s, p in rows]
    row_tables = torch.tensor([tables[s] for s, _ in rows])
    return positions, slots, row_tables, [p + 1 for p in positions]


def _module_step(model, cache, token_ids, positions, slots, tables, lens) -> torch.Tensor:
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        prefills=(),
        num_prefill_tokens=0,
        decode_block_tables=tables,
        decode_context_lens=torch.tensor(lens),
        decode_bias=None,
        decode_native=True,
    )
    with torch.inference_mode():
        return model(torch.tensor(token_ids), torch.tensor(positions), cache, meta)


@needs_kernel
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_step_equals_the_modules(kind: str, quantization: str, dtype: torch.dtype) -> None:
    model = _model(kind, dtype, quantization)
    expected_cache, cache = _filled_cache(model), _filled_cache(model)
    positions, slots, tables, lens = _rows()
    token_ids = [72, 101, 108, 108, 111]
    expected = _module_step(model, expected_cache, token_ids, positions, slots, tables, lens)
    plan = model.decode_plan(cache)
    assert plan is not None
    got = plan.step(*(torch.tensor(v) for v in (token_ids, positions, slots)), tables,
                    torch.tensor(lens))  # fmt: skip
    assert got.dtype == dtype
    # Same kernels, same rounding after every op: equal up to float summation order. With the
    # native int4 kernel's per-group int8 activations, a last-bit difference in float32 can
    # move a value across a rounding boundary, and the flips spread through the layers of
    # this random model: there the whole output must agree to a few percent of its norm.
    pairs = [(got, expected)]
    pools, expected_pools = (
        (*cache.keys, *cache.values),
        (*expected_cache.keys, *expected_cache.values),
    )
    pairs += zip(pools, expected_pools, strict=True)
    for mine, theirs in pairs:
        if quantization == "int4" and native.int4_supported() and dtype == torch.float32:
            assert (mine - theirs).norm() <= 0.05 * theirs.norm()
        else:
            tolerance = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(mine, theirs, atol=tolerance, rtol=tolerance)


def _generate(
    model, native_step: bool, speculative: bool = False, rows_seen: list[int] | None = None
) -> dict[str, list[int]]:
    engine = tiny_engine(model, num_blocks=96)
    plan = engine.runner.decode_plan
    if not native_step:
        engine.runner.decode_plan = None
    else:
        assert plan is not None
        if rows_seen is not None:  # record each native step's row count
            step = plan.step
            plan.step = lambda ids, *rest: rows_seen.append(len(ids)) or step(ids, *rest)
    if speculative:
        engine.speculator.config = SpeculativeConfig(method="ngram", num_speculative_tokens=3)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(["la la la la la la", "a cat sat on a mat, a cat", "xyz"]):
        engine.add_request(str(i), encode_bytes(prompt), params)
    return run_to_completion(engine)


@needs_kernel
@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_engine_output_is_the_same_with_the_native_step_or_without(quantization: str) -> None:
    model = _model("llama", torch.bfloat16, quantization)
    assert _generate(model, native_step=True) == _generate(model, native_step=False)


@needs_kernel
def test_speculative_rows_run_natively_and_keep_greedy_output() -> None:
    model = _model("llama", torch.float32, "int8")
    plain = _generate(model, native_step=False)
    rows: list[int] = []
    assert _generate(model, native_step=True, speculative=True, rows_seen=rows) == plain
    assert max(rows) > 3  # three decodes, or one sequence's k + 1 rows beside others


@needs_kernel
def test_bad_rows_are_refused_with_a_clear_error() -> None:
    model = _model("llama", torch.float32, "none")
    cache = _filled_cache(model)
    plan = model.decode_plan(cache)
    assert plan is not None
    one = torch.tensor([0])
    table = torch.tensor([[0]])
    with pytest.raises(ValueError, match="token id 999 out of range"):
        plan.step(torch.tensor([999]), one, one, table, torch.tensor([1]))
    with pytest.raises(ValueError, match="position 100000 out of range"):
        plan.step(one, torch.tensor([100000]), one, table, torch.tensor([1]))
    many = torch.zeros(plan.max_rows + 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="rows"):
        plan.step(many, many, many, many.view(-1, 1), many + 1)
    with pytest.raises(ValueError, match="int64"):
        plan.step(one.int(), one, one, table, torch.tensor([1]))
    # The plan still works after refusing.
    assert plan.step(one, one, one, table, torch.tensor([1])).shape == (1, 64)


def test_no_plan_for_moe_models() -> None:
    model = tiny_model(tiny_config("mixtral"))
    assert model.decode_plan(_filled_cache(model)) is None


def test_a_long_prompt_in_chunks_that_sample_nothing() -> None:
    """Chunked prefill: the first chunks of a long prompt turn no row into logits (with the
    native int4 kernel that once divided by zero on 0 rows and killed the process)."""
    model = _model("llama", torch.bfloat16, "int4")
    engine = tiny_engine(model, num_blocks=96, max_num_batched_tokens=32)
    prompt = encode_bytes("a long prompt that spans several prefill chunks. " * 3)
    assert len(prompt) > 3 * 32
    engine.add_request("long", prompt, SamplingParams(max_tokens=8, temperature=0.0))
    assert len(run_to_completion(engine)["long:0"]) == 8
