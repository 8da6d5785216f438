"""The frozen SAM3 path of the geometry fine-tune, assembled from the SAM3 modules in SAM3's key layout:
embedding (B, 1024, 72, 72) + box/point prompts -> FPN -> geometry encoder -> transformer encoder ->
decoder -> query scores + segmentation head masks (B, Q, 288, 288). The ViT trunk is not built.

Like the reference FT, the prompt is the geometry encoder's tokens alone (no text tokens; SAM3's text
encoder is not built). FEATURE_SIZE 72 (default) feeds the 72x72 level SAM3 inference uses (its scalp=1
drops 36x36) and gives the segmentation head the levels 288/144/72; 36 reproduces the reference FT
(encoder and pooling on 36x36, the head gets all four levels)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .sam3_decoder import TransformerDecoder
from .sam3_encoder import TransformerEncoder
from .sam3_geometry import GeometryEncoder
from .sam3_neck import SimpleFPN, load_part, read_sam3_state
from .sam3_scoring import DotProductScoring
from .sam3_seg_head import SegmentationHead

PREFIXES = {
    "neck.convs": "detector.backbone.vision_backbone.convs.",
    "geometry_encoder": "detector.geometry_encoder.",
    "encoder": "detector.transformer.encoder.",
    "decoder": "detector.transformer.decoder.",
    "scoring": "detector.dot_prod_scoring.",
    "segmentation_head": "detector.segmentation_head.",
}


@dataclass(frozen=True)
class FrozenDims:
    embed_dim: int = 1024
    d_model: int = 256
    ffn: int = 2048
    heads: int = 8
    encoder_layers: int = 6
    geometry_layers: int = 3
    decoder_layers: int = 6
    queries: int = 200
    scoring_hidden: int = 2048


SAM3_DIMS = FrozenDims()
TINY_DIMS = FrozenDims(32, 16, 32, 2, 1, 1, 2, 8, 32)  # same code at test size


class FrozenSAM3(nn.Module):
    """40,547,382 parameters at SAM3's sizes (7.80 + 8.22 + 9.47 + 11.58 + 1.18 + 2.30 M)."""

    def __init__(self, dims: FrozenDims = SAM3_DIMS, feature_size: int = 72) -> None:
        super().__init__()
        if feature_size not in (72, 36):
            raise ValueError(f"MODEL.FEATURE_SIZE: expected 72 or 36, got {feature_size}")
        d = dims.d_model
        self.feature_size = feature_size
        self.compile_mode: str | None = None  # set by compile_frozen
        self.neck = SimpleFPN(dims.embed_dim, d)
        self.geometry_encoder = GeometryEncoder(d, dims.ffn, dims.heads, dims.geometry_layers)
        self.encoder = TransformerEncoder(d, dims.ffn, dims.heads, dims.encoder_layers)
        self.decoder = TransformerDecoder(d, dims.ffn, dims.heads, dims.decoder_layers, dims.queries)
        self.scoring = DotProductScoring(d, d, dims.scoring_hidden)
        self.segmentation_head = SegmentationHead(d, 3, dims.heads)

    def component_sizes(self) -> dict[str, int]:
        """Parameter count per component (printed at start-up; the guide's table is wrong)."""
        return {name: sum(p.numel() for p in self.get_submodule(name).parameters()) for name in PREFIXES}

    @property
    def level(self) -> int:
        """Index of the FPN level the encoder and geometry pooling use: 2 (scale 1, 72x72) or 3 (scale 0.5)."""
        return 2 if self.feature_size == 72 else 3

    def image_features(self, embed: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The prompt-independent part: FPN levels up to the used one (finest first; at 72 the 36x36 branch is
        not run, nothing reads it) and that level's position encoding. Computed once per embedding and step
        (`features=` of forward) when several decode iterations share it."""
        feats = tuple(self.neck.convs[i](embed) for i in range(self.level + 1))
        return feats, self.neck.position_encoding(feats[-1])

    def forward(
        self,
        embed: torch.Tensor | None,
        points: torch.Tensor,
        point_pad: torch.Tensor,
        boxes: torch.Tensor,
        box_pad,
        point_labels: torch.Tensor | None = None,
        mask_query: torch.Tensor | str | None = None,
        features: tuple[tuple[torch.Tensor, ...], torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """embed (B, C, S, S); points (B, Np, 2) / boxes (B, Nb, 4) normalised xy / cxcywh, pads True = padding;
        point_labels (B, Np) 1 = positive, 0 = negative (default all positive; refinement points need 0).
        -> pred_logits (B, Q) (last decoder layer's scores), pred_masks (B, Q, 4S, 4S), presence_logit (B,).
        mask_query: None = all Q masks; a (B,) index tensor = that query's mask only; "best" = the top-scoring
        query's mask only (argmax of pred_logits, returned as "query"); pred_masks is then (B, 1, 4S, 4S).
        features: image_features(embed) computed before (embed is then not read)."""
        if isinstance(mask_query, str) and mask_query != "best":
            raise ValueError(f"mask_query: expected None, an index tensor or 'best', got {mask_query!r}")
        feats, img_pos = features if features is not None else self.image_features(embed)
        return self.decode(feats, img_pos, points, point_pad, boxes, box_pad, point_labels, mask_query)

    def decode(
        self,
        feats: tuple[torch.Tensor, ...],
        img_pos: torch.Tensor,
        points: torch.Tensor,
        point_pad: torch.Tensor,
        boxes: torch.Tensor,
        box_pad: torch.Tensor,
        point_labels: torch.Tensor | None,
        mask_query: torch.Tensor | str | None,
    ) -> dict[str, torch.Tensor]:
        """The prompt-dependent part (see forward): geometry encoder -> encoder -> decoder -> scores -> masks."""
        img = feats[-1]
        prompt, prompt_pad = self.geometry_encoder(points, point_pad, boxes, box_pad, img, img_pos, point_labels)
        memory, memory_pos = self.encoder(img, img_pos, prompt, prompt_pad)
        dec = self.decoder(memory, memory_pos, tuple(img.shape[-2:]), prompt, prompt_pad)
        logits = self.scoring(dec["hs"][-1:], prompt, prompt_pad)[0, ..., 0]  # only the last layer's are read
        if isinstance(mask_query, str):
            mask_query = logits.argmax(dim=1)
        seg = self.segmentation_head(feats, dec["hs"][-1], memory, prompt, prompt_pad, mask_query, semantic=False)
        out = {"pred_logits": logits, "pred_masks": seg["pred_masks"], "presence_logit": dec["presence_logits"][-1]}
        if mask_query is not None:
            out["query"] = mask_query
        return out


COMPILE_MODES = ("default", "reduce-overhead")


def compile_frozen(model: FrozenSAM3, backend: str | Callable = "inductor", mode: str = "default") -> FrozenSAM3:
    """torch.compile the frozen path in place (MODEL.COMPILE_FROZEN; default auto = reduce-overhead on CUDA):
    image_features and decode each become one static-shape graph (forward, and forward+backward to the embedding for the
    student path); parameters and state dict are untouched. Keep prompt counts fixed (pad_prompts) or every
    new count compiles again. backend "aot_eager" checks capture and autograd without code generation (tests).
    mode "reduce-overhead" (inductor only): CUDA graphs replay each graph with one launch; call
    `frozen_step_begin` at the start of each step (outputs of a replay are overwritten by the next)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode: expected one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    opts: dict = {"fullgraph": True, "dynamic": False, "backend": backend}
    if backend == "inductor":
        opts["mode"] = mode
    model.image_features = torch.compile(model.image_features, **opts)
    model.decode = torch.compile(model.decode, **opts)
    model.compile_mode = mode
    return model


def frozen_step_begin(model: FrozenSAM3) -> None:
    """Tell CUDA-graph trees a new training step starts (MODEL.COMPILE_FROZEN reduce-overhead); a no-op
    otherwise. Without it a step that runs the no-grad teacher graph and then the student graph may be taken
    for one iteration and keep the previous step's outputs alive."""
    if getattr(model, "compile_mode", None) == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()


def load_frozen_sam3(model: FrozenSAM3, path: str, flag: str = "MODEL.SAM3_CHECKPOINT") -> None:
    """All six components from one local sam3.pt (strict per component, one-line errors)."""
    sd = read_sam3_state(path, flag)
    for name, prefix in PREFIXES.items():
        load_part(model.get_submodule(name), sd, prefix, f"{flag}: {path}")


def build_frozen_sam3(
    checkpoint: str = "", dims: FrozenDims = SAM3_DIMS, feature_size: int = 72, dtype: torch.dtype = torch.float32
) -> FrozenSAM3:
    """Eval mode, no gradients to its weights (gradients still flow to the input embedding)."""
    model = FrozenSAM3(dims, feature_size)
    if checkpoint:
        load_frozen_sam3(model, checkpoint)
    model.eval().requires_grad_(False)
    return model.to(dtype)
