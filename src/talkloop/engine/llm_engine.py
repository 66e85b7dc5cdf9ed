"""`LLMEngine`: add requests, `step()` them forward together, abort them.

The step is schedule -> run -> post-process. Requests are validated on the way in, so a bad
one is refused with a clear error while the others keep being served.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from typing import Any, Protocol

import torch

from talkloop.engine.attention import KVCache
from talkloop.engine.block_manager import BlockManager
from talkloop.engine.config import EngineConfig
from talkloop.engine.errors import EngineError, InvalidRequestError
from talkloop.engine.model_runner import ModelRunner, RunnerOutput
from talkloop.engine.models.llama import LlamaForCausalLM
from talkloop.engine.output_processor import (
    Detokenizer,
    TextState,
    append_text,
    check_stop,
    take_delta,
)
from talkloop.engine.outputs import RequestOutput, TokenLogprob
from talkloop.engine.sampler import SamplerOutput
from talkloop.engine.sampling_params import SamplingParams
from talkloop.engine.scheduler import Scheduler
from talkloop.engine.sequence import FinishReason, Sequence
from talkloop.engine.speculative import Speculator
from talkloop.engine.structured.spec import StructuredOutput
from talkloop.engine.system import kv_cache_num_blocks, setup_torch

logger = logging.getLogger(__name__)

DetokenizerFactory = Callable[[SamplingParams, list[int]], Detokenizer]


class GrammarCompilerLike(Protocol):
    """`structured.grammar.GrammarCompiler` (kept behind a protocol: llguidance loads lazily)."""

    def compile(self, spec: StructuredOutput) -> Any: ...


class LLMEngine:
    def __init__(
        self,
        model: LlamaForCausalLM,
        config: EngineConfig,
        detokenizer_factory: DetokenizerFactory,
        stop_token_ids: SequenceOf[int] = (),
        grammar_compiler: Callable[[], GrammarCompilerLike] | None = None,
    ) -> None:
        setup_torch(config)
        self.config = config
        self.model_config = model.config
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        dtype = next(model.parameters()).dtype
        num_blocks = kv_cache_num_blocks(config, model.config, dtype)
        block_size = config.cache.block_size
        self.block_manager = BlockManager(num_blocks, block_size, config.cache.enable_prefix_cache)
        cache = KVCache(
            model.config.num_layers,
            num_blocks,
            block_size,
            model.config.num_kv_heads,
            model.config.head_dim,
            dtype,
            config.device,
        )
        self.runner = ModelRunner(model, cache, self.block_manager, config.device)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.speculator = Speculator(config.speculative)
        self.stop_token_ids = frozenset(stop_token_ids)
        self._detokenizer_factory = detokenizer_factory
        self._grammar_compiler_factory = grammar_compiler
        self._grammar_compiler: GrammarCompilerLike | None = None
        self._requests: dict[str, list[Sequence]] = {}
        self._text: dict[int, TextState] = {}
        self._seq_ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Queue a request; raises InvalidRequestError (naming the field) if it cannot run."""
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        self._validate(prompt_token_ids, params)
        # Compile first: a bad schema or regex is refused before anything is queued.
        grammar = self._compiler().compile(params.structured) if params.structured else None
        seqs = [
            self._new_sequence(request_id, i, prompt_token_ids, params) for i in range(params.n)
        ]
        for seq in seqs:
            seq.grammar = grammar.matcher() if grammar is not None else None
        self._requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its cache blocks (unknown ids are ignored)."""
        for seq in self._requests.pop(request_id, []):
            if not seq.is_finished:
                seq.finish(FinishReason.ABORT)
            self.scheduler.finish(seq)
            self._text.pop(seq.seq_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def stats(self) -> dict[str, float]:
        """Gauges and counters for /metrics (vLLM's names where it has one)."""
        blocks = self.block_manager
        cache = blocks.cache
        speculation: dict[str, float] = {}
        if self.speculator.enabled:
            speculation = {
                "spec_decode_num_draft_tokens": float(self.speculator.num_draft_tokens),
                "spec_decode_num_accepted_tokens": float(self.speculator.num_accepted_tokens),
            }
        return speculation | {
            "num_requests_running": float(len(self.scheduler.running)),
            "num_requests_waiting": float(len(self.scheduler.waiting)),
            # Blocks in use by live requests (cached blocks nobody uses count as free).
            "kv_cache_usage_perc": 1.0 - blocks.num_available_blocks / blocks.num_blocks,
            "prefix_cache_queries_tokens": float(cache.num_query_tokens if cache else 0),
            "prefix_cache_hits_tokens": float(cache.num_hit_tokens if cache else 0),
            "prefix_cache_hit_rate": cache.hit_rate if cache else 0.0,
            "prefix_cache_blocks": float(cache.num_cached_blocks if cache else 0),
        }

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.speculator.plan(self.scheduler.running, self.max_model_len)
        scheduled = self.speculator.attach_drafts(self.scheduler.schedule())
        if not scheduled.scheduled:
            return []
        try:
            out = self.runner.run(scheduled)
            accepted = self.speculator.verify(out.verify_seqs, out.verify_logits)
        except Exception as exc:  # a failed forward fails its batch, never the engine
            logger.exception("model step failed")
            return self._fail({s.seq.request_id for s in scheduled.scheduled}, exc)
        for item in scheduled.scheduled:
            tokens = accepted.get(item.seq.seq_id)
            # Verified KV: the last real token plus the accepted drafts (= len(tokens)).
            item.seq.num_computed_tokens += len(tokens) if tokens else item.num_new_tokens
            self.block_manager.cache_full_blocks(item.seq)
        return self._postprocess(out, accepted)

    def _postprocess(
        self, out: RunnerOutput, accepted: dict[int, list[int]]
    ) -> list[RequestOutput]:
        touched: dict[str, None] = {}
        failed: list[RequestOutput] = []
        if out.sampled is not None:
            token_ids = out.sampled.token_ids.tolist()
            for row, (seq, token_id) in enumerate(zip(out.sampled_seqs, token_ids, strict=True)):
                if seq.request_id not in self._requests:
                    continue  # failed earlier in this step (another choice of the request)
                try:
                    self._append(seq, token_id, row, out.sampled)
                except EngineError as exc:  # e.g. a grammar violation: fail that request only
                    logger.exception("request %s failed", seq.request_id)
                    failed += self._fail({seq.request_id}, exc)
                    touched.pop(seq.request_id, None)
                    continue
                touched[seq.request_id] = None
        for seq, _ in out.verify_seqs:
            for token_id in accepted[seq.seq_id]:
                if seq.is_finished:
                    break
                self._append(seq, token_id)
            touched[seq.request_id] = None
        return failed + [self._request_output(request_id) for request_id in touched]

    def _append(
        self, seq: Sequence, token_id: int, row: int = 0, sampled: SamplerOutput | None = None
    ) -> None:
        seq.append_token(token_id)
        grammar_done = self._advance_grammar(seq, token_id)
        state = self._text[seq.seq_id]
        if sampled is not None and sampled.logprobs is not None and seq.params.logprobs is not None:
            state.pending_logprobs.append(
                _token_logprob(sampled, row, token_id, seq.params.logprobs)
            )
        reason = check_stop(seq, token_id, self.stop_token_ids, self.max_model_len)
        if grammar_done:  # the constrained output is complete (even with ignore_eos)
            reason = FinishReason.STOP
        if reason is FinishReason.STOP:
            state.stop_reason = token_id
        elif append_text(state, seq, token_id):
            reason = FinishReason.STOP
        if reason is not None:
            seq.finish(reason)
            self.scheduler.finish(seq)

    @staticmethod
    def _advance_grammar(seq: Sequence, token_id: int) -> bool:
        """Feed the token to the sequence's grammar; True when it ends a finished output."""
        grammar = seq.grammar
        if grammar is None:
            return False
        if grammar.is_finished:
            return token_id in grammar.eos_token_ids
        grammar.advance(token_id)
        return False

    def _request_output(self, request_id: str) -> RequestOutput:
        seqs = self._requests[request_id]
        deltas = tuple(take_delta(self._text[s.seq_id], s) for s in seqs)
        finished = all(s.is_finished for s in seqs)
        if finished:
            del self._requests[request_id]
            for seq in seqs:
                self._text.pop(seq.seq_id, None)
        first = seqs[0]
        num_prompt = len(first.prompt_token_ids)
        queued = None
        if first.first_scheduled_time is not None:
            queued = first.first_scheduled_time - first.arrival_time
        return RequestOutput(
            request_id, deltas, finished, num_prompt, first.num_cached_tokens, queue_time_s=queued
        )

    def _fail(self, request_ids: set[str], exc: Exception) -> list[RequestOutput]:
        outputs = []
        for request_id in request_ids:
            seqs = self._requests.get(request_id, [])
            num_prompt = len(seqs[0].prompt_token_ids) if seqs else 0
            self.abort(request_id)
            outputs.append(RequestOutput(request_id, (), True, num_prompt, error=str(exc)))
        return outputs

    # ---- helpers ----------------------------------------------------------------------------
    def _compiler(self) -> GrammarCompilerLike:
        if self._grammar_compiler is None:
            if self._grammar_compiler_factory is None:
                raise InvalidRequestError(
                    "structured output needs a tokenizer-backed engine (none configured)",
                    "response_format",
                )
            self._grammar_compiler = self._grammar_compiler_factory()
        return self._grammar_compiler

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        vocab_size = self.model_config.vocab_size
        if not prompt_token_ids:
            raise InvalidRequestError("prompt is empty: send at least one token", "prompt")
        if any(not 0 <= t < vocab_size for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt has token ids outside [0, {vocab_size})", "prompt")
        if any(not 0 <= t < vocab_size for t in params.logit_bias):
            raise InvalidRequestError(
                f"logit_bias has token ids outside [0, {vocab_size})", "logit_bias"
            )
        capacity = min(
            self.max_model_len, self.block_manager.num_blocks * self.block_manager.block_size
        )
        if len(prompt_token_ids) >= capacity:
            raise InvalidRequestError(
                f"prompt is {len(prompt_token_ids)} tokens; the context window holds {capacity} "
                "including at least one generated token",
                "prompt",
            )
        if len(prompt_token_ids) + params.max_tokens > capacity:
            raise InvalidRequestError(
                f"max_tokens={params.max_tokens} cannot fit: prompt {len(prompt_token_ids)} + "
                f"max_tokens must be <= {capacity}; use max_tokens <= "
                f"{capacity - len(prompt_token_ids)}",
                "max_tokens",
            )

    def _new_sequence(
        self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams
    ) -> Sequence:
        seq = Sequence(next(self._seq_ids), request_id, index, list(prompt_token_ids), params)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed * 1_000_003 + index)
        detokenizer = self._detokenizer_factory(params, seq.prompt_token_ids)
        self._text[seq.seq_id] = TextState(detokenizer)
        return seq


def _token_logprob(sampled: SamplerOutput, row: int, token_id: int, num_top: int) -> TokenLogprob:
    chosen = float(sampled.logprobs[row]) if sampled.logprobs is not None else 0.0
    top: tuple[tuple[int, float], ...] = ()
    if num_top and sampled.top_token_ids is not None and sampled.top_logprobs is not None:
        ids = sampled.top_token_ids[row, :num_top].tolist()
        values = sampled.top_logprobs[row, :num_top].tolist()
        # Constrained rows may allow fewer tokens than asked for: drop the -inf ones.
        top = tuple((t, v) for t, v in zip(ids, values, strict=True) if math.isfinite(v))
    return TokenLogprob(token_id, chosen, top)
