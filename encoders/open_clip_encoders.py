"""open_clip image and text towers as frozen encoders.

Pooled outputs are the CLIP embeddings (``encode_image`` / ``encode_text``, not normalised), so an
image tower and a text tower of the same checkpoint already share a space.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from encoders.base import Encoder, EncoderOutput, Modality, check_texts
from encoders.image_io import load_images
from encoders.tiny import resolve_model_path
from encoders.utils import torch_dtype

LOCAL_DIR_PREFIX = "local-dir:"


def _open_clip_source(model_name: str) -> str:
    """``tiny:`` names and plain directories become open_clip's ``local-dir:`` schema."""
    resolved = resolve_model_path(model_name)
    if not resolved.startswith(LOCAL_DIR_PREFIX) and os.path.isdir(resolved):
        return LOCAL_DIR_PREFIX + resolved
    return resolved


@functools.lru_cache(maxsize=8)
def _tokenizer(source: str) -> Any:
    """open_clip's tokenizer for ``source``, built once per process (building the BPE tokenizer costs ~1 s; a
    sweep or a test builds many towers of one model). It holds no per-tower state, only its own BPE cache."""
    import open_clip

    return open_clip.get_tokenizer(source)


def _create(model_name: str, pretrained: str | None, dtype: str) -> tuple[nn.Module, Any]:
    import open_clip

    source = _open_clip_source(model_name)
    model, _, preprocess = open_clip.create_model_and_transforms(source, pretrained=pretrained)
    model.to(torch_dtype(dtype))
    return model, preprocess


class _OpenClipBase(Encoder):
    def __init__(self, model_name: str, pretrained: str | None, dtype: str) -> None:
        super().__init__()
        self.model_name = model_name
        self.pretrained = pretrained
        self.dtype_name = self._init_args["dtype"]  # as given (a torch.dtype by name): part of the cache_key

    def spec(self) -> dict[str, Any]:
        return {
            **super().spec(),
            "model_name": self.model_name,
            "pretrained": self.pretrained,  # tag (e.g. "laion2b_s34b_b79k") or file path: the revision
            "dtype": self.dtype_name,
        }


class OpenClipImageEncoder(_OpenClipBase):
    """The image tower of an open_clip model.

    Args:
        model_name: An open_clip architecture (``ViT-B-32``), ``hf-hub:org/repo``, ``local-dir:/path``
            or a plain directory holding ``open_clip_config.json`` + weights, or ``tiny:open-clip``.
        pretrained: Tag (``laion2b_s34b_b79k``) or checkpoint file for a bare architecture name;
            ignored for hub/local directories, which carry their weights.
        dtype: Weight/compute dtype name.

    Outputs: ``pooled`` = ``encode_image`` (``[B, embed_dim]``); for ViT towers ``tokens`` are the
    final patch states after ``ln_post`` (``[B, P, width]``, width = ``token_dim``), all unmasked.
    Other towers (ModifiedResNet, timm trunks) give pooled vectors only (``has_tokens`` False).
    """

    modality = Modality.IMAGE

    def __init__(self, model_name: str, pretrained: str | None = None, dtype: str = "float32") -> None:
        super().__init__(model_name, pretrained, dtype)
        from open_clip.transformer import VisionTransformer

        model, self.transform = _create(model_name, pretrained, dtype)
        self.visual = model.visual
        del model  # the text tower is not needed here
        self.output_dim = int(self.visual.output_dim)
        self.has_tokens = isinstance(self.visual, VisionTransformer)
        if self.has_tokens:
            self.visual.output_tokens = True  # forward returns (pooled, tokens)
            self.token_dim = int(self.visual.transformer.width)
        self.image_size = list(getattr(self.visual, "image_size", ()))
        self.freeze()

    def spec(self) -> dict[str, Any]:
        cfg = getattr(self.visual, "preprocess_cfg", {}) or {}
        return {**super().spec(), "image_size": self.image_size,
                "mean": list(cfg.get("mean", ())), "std": list(cfg.get("std", ()))}

    def preprocess(self, items: Sequence[Any]) -> dict[str, Tensor]:
        """Images -> ``{"pixel_values": [B, 3, H, W]}`` through open_clip's eval transform."""
        return {"pixel_values": torch.stack([self.transform(img) for img in load_images(items)])}

    def encode(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        x = inputs["pixel_values"].to(self.device, torch_dtype(self.dtype_name))
        if not self.has_tokens:
            return EncoderOutput(pooled=self.visual(x))
        pooled, tokens = self.visual(x)  # [B, E], [B, P, W]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=mask)


class OpenClipTextEncoder(_OpenClipBase):
    """The text tower of an open_clip model, with its own tokenizer (BPE for OpenAI-style CLIPs).

    Args:
        model_name: As :class:`OpenClipImageEncoder`.
        pretrained: As :class:`OpenClipImageEncoder`.
        dtype: Weight/compute dtype name.

    Outputs: ``pooled`` = ``encode_text`` (``[B, embed_dim]``). ``tokens`` are the final states after
    ``ln_final`` (``[B, context_length, width]``) with ``mask`` True up to and including the end
    token, for the built-in text transformer (CLIP) and ``TextTransformer`` towers; HF-text towers
    and CoCa-style towers give pooled vectors only (``has_tokens`` False). The tower is causal, so
    the padding after the end token never changes the real tokens' states.
    """

    modality = Modality.TEXT

    def __init__(self, model_name: str, pretrained: str | None = None, dtype: str = "float32") -> None:
        super().__init__(model_name, pretrained, dtype)
        import open_clip
        from open_clip.transformer import TextTransformer

        model, _ = _create(model_name, pretrained, dtype)
        model.visual = None  # drop the image tower's weights
        self.model = model
        self.tokenizer = _tokenizer(_open_clip_source(model_name))
        inner = getattr(self.tokenizer, "tokenizer", None)  # HF tokenizers wrap a transformers one
        self.pad_id = int(getattr(inner, "pad_token_id", None) or 0)
        self.context_length = int(getattr(self.tokenizer, "context_length", 77))
        self._builtin = isinstance(model, open_clip.CLIP)
        text = getattr(model, "text", None)
        self.has_tokens = self._builtin or (isinstance(text, TextTransformer) and text.cls_emb is None)
        if self._builtin:
            self.token_dim = int(model.transformer.width)
        elif self.has_tokens:
            text.output_tokens = True
            self.token_dim = int(text.width)
        with torch.no_grad():
            self.output_dim = int(model.encode_text(self.tokenizer(["a"])).shape[-1])
        self.freeze()

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "context_length": self.context_length}

    def preprocess(self, items: Sequence[str]) -> dict[str, Tensor]:
        """Strings -> ``{"input_ids": [B, context_length]}`` (long) with open_clip's tokenizer."""
        return {"input_ids": self.tokenizer(check_texts(items)).long()}

    def encode(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        text = inputs["input_ids"].to(self.device)
        m = self.model
        if not self.has_tokens:
            return EncoderOutput(pooled=m.encode_text(text))
        if self._builtin:
            pooled, tokens = _clip_text_with_tokens(m, text)
        else:
            pooled, tokens = m.text(text)
        mask = text != self.pad_id  # [B, T]
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=mask)


def _clip_text_with_tokens(m: nn.Module, text: Tensor) -> tuple[Tensor, Tensor]:
    """``open_clip.CLIP.encode_text`` step by step, keeping the token states it pools from."""
    from open_clip.transformer import text_global_pool

    cast_dtype = m.transformer.get_cast_dtype()
    x = m.token_embedding(text).to(cast_dtype) + m.positional_embedding.to(cast_dtype)
    x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))  # [B, T, W]
    pooled = text_global_pool(x, text, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
    if m.text_projection is not None:
        pooled = m.text_projection(pooled) if isinstance(m.text_projection, nn.Linear) else pooled @ m.text_projection
    return pooled, x


# -- tiny twin --------------------------------------------------------------------------------

TINY_OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_open_clip(directory: Path) -> None:
    """open_clip's own local-dir format: ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_OPEN_CLIP_CFG)
    config = {
        "model_cfg": TINY_OPEN_CLIP_CFG,
        "preprocess_cfg": {"size": 32, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                           "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic",
                           "resize_mode": "shortest"},
    }
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
