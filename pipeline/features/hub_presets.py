"""The keras-hub image presets `make backbones` suggests: module-level data, as keras-hub keeps its own.

These values are for the listing only, so it works offline and without keras-hub;
building a backbone always reads the preset's own config (`pipeline.features.hub`).
Where each value comes from (docs/backbones.md): the image size is in the preset's
name or, for DINOv2, keras-hub's DINOv2 default input (224 px, 16x16 patches of 14);
the width is the model card's hidden size; parameters are keras-hub 0.32.0's preset
metadata (the whole preset: the text tower too for CLIP and SigLIP); the licence is
the model card's.
"""

from __future__ import annotations

from typing import NamedTuple


class HubPreset(NamedTuple):
    preset: str
    family: str
    image_size: int
    width: int
    pooling: str  # the family's default pooling (pipeline.features.hub.FAMILIES)
    params_millions: float
    licence: str


SHORTLIST: tuple[HubPreset, ...] = (
    HubPreset("dinov2_small", "DINOv2 ViT-S/14", 224, 384, "cls_mean", 22.6, "Apache-2.0"),
    HubPreset("dinov2_base", "DINOv2 ViT-B/14", 224, 768, "cls_mean", 87.6, "Apache-2.0"),
    HubPreset("dinov2_large", "DINOv2 ViT-L/14", 224, 1024, "cls_mean", 305.8, "Apache-2.0"),
    HubPreset("siglip_base_patch16_224", "SigLIP ViT-B/16", 224, 768, "pooled", 203.2, "Apache-2.0"),
    HubPreset("siglip_so400m_patch14_224", "SigLIP So400m/14", 224, 1152, "pooled", 877.4, "Apache-2.0"),
    HubPreset("siglip2_base_patch16_224", "SigLIP 2 ViT-B/16", 224, 768, "pooled", 375.2, "Apache-2.0"),
    HubPreset("siglip2_so400m_patch14_224", "SigLIP 2 So400m/14", 224, 1152, "pooled", 1135.5, "Apache-2.0"),
    HubPreset("clip_vit_base_patch16", "CLIP ViT-B/16 (OpenAI)", 224, 768, "cls", 149.6, "MIT"),
    HubPreset("clip_vit_large_patch14", "CLIP ViT-L/14 (OpenAI)", 224, 1024, "cls", 427.6, "MIT"),
    HubPreset("clip_vit_b_32_laion2b_s34b_b79k", "OpenCLIP ViT-B/32 (LAION-2B)", 224, 768, "cls", 151.3, "MIT"),
)
