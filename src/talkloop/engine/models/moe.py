"""Mixture-of-experts feed-forward: Mixtral top-k routing and Qwen2-MoE shared experts.

Dispatch is batched by expert: tokens are sorted by the expert they were routed to and each
expert runs once on its group (a loop over experts, never over tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from talkloop.engine.config import ModelConfig


class MoEFeedForward(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        num_experts, dim = config.num_experts, config.hidden_size
        inter = config.moe_intermediate_size or config.intermediate_size
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router = nn.Parameter(torch.empty(num_experts, dim, dtype=dtype), requires_grad=False)
        # Stacked expert weights: gate and up fused -> [E, 2I, D]; down [E, D, I].
        self.gate_up = nn.Parameter(
            torch.empty(num_experts, 2 * inter, dim, dtype=dtype), requires_grad=False
        )
        self.down = nn.Parameter(
            torch.empty(num_experts, dim, inter, dtype=dtype), requires_grad=False
        )
        self.shared: SharedExpert | None = None
        if config.shared_expert_intermediate_size:
            self.shared = SharedExpert(dim, config.shared_expert_intermediate_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        router_logits = F.linear(x, self.router)  # [T, E]
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self._dispatch(x, weights.to(x.dtype), expert_ids)
        if self.shared is not None:
            out = out + self.shared(x)
        return out

    def _dispatch(
        self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> torch.Tensor:
        flat_experts = expert_ids.flatten()  # [T*k]
        order = torch.argsort(flat_experts, stable=True)
        token_of = order // self.top_k  # source token of each sorted assignment
        counts = torch.bincount(flat_experts, minlength=self.gate_up.shape[0]).tolist()
        sorted_weights = weights.flatten()[order].unsqueeze(1)  # [T*k, 1]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            tokens = token_of[rows]
            hidden = _swiglu(F.linear(x[tokens], self.gate_up[expert]))
            expert_out = F.linear(hidden, self.down[expert]) * sorted_weights[rows]
            out.index_add_(0, tokens, expert_out)
            start += count
        return out


class SharedExpert(nn.Module):
    """Qwen2-MoE's always-on expert, scaled by a sigmoid gate per token."""

    def __init__(self, dim: int, inter: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(2 * inter, dim, dtype=dtype), requires_grad=False)
        self.down = nn.Parameter(torch.empty(dim, inter, dtype=dtype), requires_grad=False)
        self.gate = nn.Parameter(torch.empty(1, dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(_swiglu(F.linear(x, self.gate_up)), self.down)
        return torch.sigmoid(F.linear(x, self.gate)) * hidden


def _swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
