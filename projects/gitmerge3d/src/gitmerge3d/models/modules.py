"""PointModule / PointSequential: Pointcept's containers, so submodule names (state-dict keys) match.

A ``PointSequential`` routes a ``Point`` through its children: Point modules take the Point, sparse
convs take ``point.sparse_conv_feat`` (and update ``feat``), plain torch modules take ``point.feat``
(and update the sparse tensor's features).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .sparse_conv import SparseConv3d, SparseTensor, SubMConv3d
from .structure import Point

SPARSE_MODULES = (SubMConv3d, SparseConv3d)


class PointModule(nn.Module):
    """Marker: the module takes and returns a ``Point``."""


class PointSequential(PointModule):
    def __init__(self, *args, **kwargs):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for name, module in args[0].items():
                self.add_module(name, module)
        else:
            for idx, module in enumerate(args):
                self.add_module(str(idx), module)
        for name, module in kwargs.items():
            self.add_module(name, module)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, idx):
        return list(self._modules.values())[idx]

    def add(self, module: nn.Module, name: str | None = None) -> None:
        name = str(len(self._modules)) if name is None else name
        if name in self._modules:
            raise KeyError(f"PointSequential already has a module named {name!r}")
        self.add_module(name, module)

    def forward(self, x):
        for module in self._modules.values():
            if isinstance(module, PointModule):
                x = module(x)
            elif isinstance(module, SPARSE_MODULES):
                if isinstance(x, Point):
                    x["sparse_conv_feat"] = module(x["sparse_conv_feat"])
                    x["feat"] = x["sparse_conv_feat"].features
                else:
                    x = module(x)
            elif isinstance(x, Point):
                x["feat"] = module(x["feat"])
                if "sparse_conv_feat" in x.keys():
                    x["sparse_conv_feat"] = x["sparse_conv_feat"].replace_feature(x["feat"])
            elif isinstance(x, SparseTensor):
                if x.indices.shape[0] != 0:
                    x = x.replace_feature(module(x.features))
            else:
                x = module(x)
        return x
