"""The adapter of docs/writing-an-adapter.md, executed as written on a toy model, passes the conformance suite."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from merge_core.testing.conformance import AdapterCase, AdapterConformance

DOC = Path(__file__).resolve().parents[3] / "docs" / "writing-an-adapter.md"


def _doc_namespace() -> dict:
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


class ToyBlock(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def qkv_heads(self, h: torch.Tensor):
        b, n, c = h.shape
        return self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(self.norm1(x))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).flatten(2))
        return x + self.mlp(self.norm2(x))


class ToyViT(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, 0])


def _build() -> ToyViT:
    torch.manual_seed(0)
    return ToyViT().eval()


NS = _doc_namespace()


class TestDocAdapter(AdapterConformance):
    cases = [
        AdapterCase(
            name="doc_adapter",
            build=_build,
            inputs=lambda: torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
            patch=NS["apply_patch"],
            num_tokens=17,
            r=[3, 2, 2],
            compile_marks=("slow",),
        )
    ]
