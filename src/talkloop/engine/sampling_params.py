"""Per-request sampling parameters, validated on construction (errors name the field)."""

from __future__ import annotations

from dataclasses import dataclass, field

from talkloop.engine.errors import InvalidRequestError
from talkloop.engine.structured.spec import StructuredOutput


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequestError(f"{param} {message}", param=param)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # number of top logprobs per token (0 = only the chosen one)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None  # constrained decoding (JSON Schema, regex, choice)

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        _check(
            0.0 <= self.temperature <= 100.0,
            "temperature",
            f"must be in [0, 100], got {self.temperature}",
        )
        _check(self.top_k >= 0, "top_k", f"must be >= 0 (0 disables), got {self.top_k}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(
            0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty",
            f"must be in (0, 10], got {self.repetition_penalty}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, name, f"must be in [-2, 2], got {value}")
        _check(1 <= self.n <= 128, "n", f"must be in [1, 128], got {self.n}")
        if self.logprobs is not None:
            _check(0 <= self.logprobs <= 20, "logprobs", f"must be in [0, 20], got {self.logprobs}")
        for token_id, bias in self.logit_bias.items():
            _check(
                -100.0 <= bias <= 100.0, "logit_bias", f"values must be in [-100, 100], got {bias}"
            )
            _check(
                isinstance(token_id, int) and token_id >= 0,
                "logit_bias",
                f"has a bad token id {token_id!r}",
            )
        _check(
            all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"
        )
        _check(len(self.stop) <= 16, "stop", f"allows at most 16 strings, got {len(self.stop)}")
        _check(
            self.structured is None or isinstance(self.structured, StructuredOutput),
            "structured",
            f"must be a StructuredOutput or None, got {type(self.structured).__name__}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
