"""transformers CLIP and SigLIP vision towers as frozen encoders."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from encoders.base import Encoder, EncoderOutput, Modality
from encoders.image_io import load_images
from encoders.tiny import resolve_model_path
from encoders.utils import quiet_transformers, torch_dtype

_POOLINGS = ("pooler", "cls", "mean")


def _vision_class(model_type: str):
    """The vision-tower class for a checkpoint's ``model_type`` (full model or vision-only)."""
    import transformers as tf

    classes = {
        # A full CLIP checkpoint: keep the visual projection, so "pooler" = CLIP image_embeds.
        "clip": tf.CLIPVisionModelWithProjection,
        "clip_vision_model": tf.CLIPVisionModel,
        "siglip": tf.SiglipVisionModel,
        "siglip_vision_model": tf.SiglipVisionModel,
    }
    if model_type not in classes:
        raise ValueError(f"HFVisionEncoder supports model_type {sorted(classes)}, got {model_type!r}")
    return classes[model_type]


class HFVisionEncoder(Encoder):
    """A frozen transformers CLIP or SigLIP vision tower with its ``AutoImageProcessor``.

    Args:
        model_name_or_path: Hub id (``openai/clip-vit-base-patch32``, ``google/siglip-base-patch16-224``),
            local directory, or ``tiny:clip-vision`` / ``tiny:siglip-vision``.
        pooling: ``"pooler"`` = the model's own image vector (CLIP: projected ``image_embeds`` for a
            full CLIP checkpoint, post-LayerNorm CLS ``pooler_output`` for a vision-only one; SigLIP:
            the attention-pooling head); ``"cls"`` = CLS state of the last layer (CLIP only);
            ``"mean"`` = mean of the last layer's patch states.
        revision: Hub revision (branch, tag or commit).
        dtype: Weight/compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).

    Outputs: ``pooled [B, D]``; ``tokens`` = last-layer patch states ``[B, P, hidden]`` (CLS dropped),
    all unmasked; ``token_dim`` = hidden size.
    """

    modality = Modality.IMAGE
    has_tokens = True

    def __init__(
        self,
        model_name_or_path: str,
        pooling: str = "pooler",
        revision: str | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor

        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        self.model_name_or_path, self.pooling = model_name_or_path, pooling
        self.dtype_name = self._init_args["dtype"]  # as given (a torch.dtype by name): part of the cache_key
        path = resolve_model_path(model_name_or_path)
        config = AutoConfig.from_pretrained(path, revision=revision)
        cls = _vision_class(config.model_type)
        with quiet_transformers():  # a full CLIP/SigLIP checkpoint: the text half is left out on purpose
            self.model = cls.from_pretrained(path, revision=revision, dtype=torch_dtype(dtype))
        self.processor = AutoImageProcessor.from_pretrained(path, revision=revision)
        self.model_type = config.model_type
        self.revision = revision or getattr(self.model.config, "_commit_hash", None)
        self.is_siglip = self.model_type.startswith("siglip")
        if pooling == "cls" and self.is_siglip:
            raise ValueError("SigLIP vision towers have no CLS token; use pooling='pooler' or 'mean'")
        vcfg = self.model.config
        self.token_dim = int(vcfg.hidden_size)
        self._projected = hasattr(self.model, "visual_projection")
        self.output_dim = int(vcfg.projection_dim) if (pooling == "pooler" and self._projected) else self.token_dim
        self.image_size = int(vcfg.image_size)
        self.freeze()

    def spec(self) -> dict[str, Any]:
        p = self.processor
        return {
            **super().spec(),
            "model_name_or_path": self.model_name_or_path,
            "model_type": self.model_type,
            "revision": self.revision,
            "pooling": self.pooling,
            "dtype": self.dtype_name,
            "image_size": self.image_size,
            "mean": list(getattr(p, "image_mean", []) or []),
            "std": list(getattr(p, "image_std", []) or []),
        }

    def preprocess(self, items: Sequence[Any]) -> dict[str, Tensor]:
        """Images -> ``{"pixel_values": [B, 3, H, W]}`` through the model's image processor."""
        batch = self.processor(images=load_images(items), return_tensors="pt")
        return {"pixel_values": batch["pixel_values"]}

    def encode(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        x = inputs["pixel_values"].to(self.device, torch_dtype(self.dtype_name))
        out = self.model(pixel_values=x)
        hidden = out.last_hidden_state  # [B, 1 + P, H] for CLIP, [B, P, H] for SigLIP
        tokens = hidden if self.is_siglip else hidden[:, 1:]
        if self.pooling == "pooler":
            pooled = out.image_embeds if self._projected else out.pooler_output
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = tokens.mean(dim=1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=mask)


# -- tiny twins -------------------------------------------------------------------------------

_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=8)
_TINY_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_tiny_clip(directory: Path) -> None:
    """A full tiny ``CLIPModel`` (as ``openai/clip-vit-*`` on the hub) + its image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    # projection_dim also inside vision_config: that is where CLIPVisionModelWithProjection reads it.
    config = CLIPConfig(text_config=dict(_TINY_TEXT, projection_dim=24),
                        vision_config=dict(_TINY_VISION, projection_dim=24), projection_dim=24)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)


def build_tiny_siglip(directory: Path) -> None:
    """A full tiny ``SiglipModel`` (as ``google/siglip-*`` on the hub) + its image processor."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(0)
    config = SiglipConfig(text_config=_TINY_TEXT, vision_config=_TINY_VISION)
    SiglipModel(config).save_pretrained(directory)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
