"""BERT encoder (post-LayerNorm, absolute positions, GELU) as sentence-transformers models use it.

`BertEncoder` maps token ids and an attention mask to the last hidden states; `mean_pool` and
L2 normalisation turn them into sentence embeddings (all-MiniLM-L6-v2: 6 layers, d=384,
12 heads). Weights load from a Hugging Face `BertModel` safetensors state dict. Inference only:
no dropout, no pooler head, no token-type other than 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from talkloop.engine.errors import ModelLoadError


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    @classmethod
    def from_hf(cls, path: Path) -> BertConfig:
        """From a Hugging Face `config.json`."""
        raw = json.loads(path.read_text())
        if raw.get("model_type") != "bert" or raw.get("hidden_act", "gelu") != "gelu":
            raise ModelLoadError(
                f"{path}: expected a BERT config with gelu, got model_type="
                f"{raw.get('model_type')!r} hidden_act={raw.get('hidden_act')!r}"
            )
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            max_position_embeddings=raw["max_position_embeddings"],
            type_vocab_size=raw["type_vocab_size"],
            layer_norm_eps=raw["layer_norm_eps"],
        )


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(d, 3 * d)  # query, key, value fused
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(d, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D]; mask: [B, 1, 1, T] bool, True where a key may be attended to
        batch, seq, dim = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, T, Dh]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attn = attn.transpose(1, 2).reshape(batch, seq, dim)
        x = self.attn_norm(x + self.attn_out(attn))  # post-norm, as BERT
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))  # exact (erf) GELU


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
        self.embed_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] ids and [B, T] mask (1 = token, 0 = padding) -> [B, T, D] hidden states."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings.weight[0]
        )
        x = self.embed_norm(x)
        mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, mask)
        return x

    @classmethod
    def from_safetensors(cls, config: BertConfig, path: Path) -> BertEncoder:
        model = cls(config)
        model.load_state_dict(_from_hf_names(load_file(str(path)), config))
        return model.eval()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states of real tokens: [B, T, D], [B, T] -> [B, D]."""
    weights = attention_mask.to(hidden.dtype)[:, :, None]  # [B, T, 1]
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def sentence_embeddings(
    model: BertEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings [B, D] (sentence-transformers' pipeline)."""
    pooled = mean_pool(model(input_ids, attention_mask), attention_mask)
    return F.normalize(pooled, p=2, dim=1)


def _from_hf_names(hf: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """Hugging Face `BertModel` names (with or without a `bert.` prefix) -> this module's."""
    hf = {name.removeprefix("bert."): tensor for name, tensor in hf.items()}
    emb = "embeddings."
    try:
        state = {
            "word_embeddings.weight": hf[f"{emb}word_embeddings.weight"],
            "position_embeddings.weight": hf[f"{emb}position_embeddings.weight"],
            "token_type_embeddings.weight": hf[f"{emb}token_type_embeddings.weight"],
            "embed_norm.weight": hf[f"{emb}LayerNorm.weight"],
            "embed_norm.bias": hf[f"{emb}LayerNorm.bias"],
        }
        for i in range(config.num_layers):
            state.update(_layer_names(hf, f"encoder.layer.{i}.", f"layers.{i}."))
    except KeyError as exc:
        raise ModelLoadError(f"BERT weights lack tensor {exc.args[0]!r}") from None
    return state


def _layer_names(hf: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    attn = f"{src}attention."
    state = {}
    for kind in ("weight", "bias"):
        state[f"{dst}qkv.{kind}"] = torch.cat(
            [hf[f"{attn}self.{part}.{kind}"] for part in ("query", "key", "value")]
        )
        state[f"{dst}attn_out.{kind}"] = hf[f"{attn}output.dense.{kind}"]
        state[f"{dst}attn_norm.{kind}"] = hf[f"{attn}output.LayerNorm.{kind}"]
        state[f"{dst}ffn_in.{kind}"] = hf[f"{src}intermediate.dense.{kind}"]
        state[f"{dst}ffn_out.{kind}"] = hf[f"{src}output.dense.{kind}"]
        state[f"{dst}ffn_norm.{kind}"] = hf[f"{src}output.LayerNorm.{kind}"]
    return state
