"""Exports: a trained space as a directory (``config.json`` + ``model.safetensors``) and the code that uses it.

* ``format``: names, version, strict JSON, atomic writes, checksums, class allowlist, path confinement
  (shared by every export kind); ``weights``: safetensors written with a checksum, read after header checks;
  ``rebuild``: encoders and projectors rebuilt from config.json through the allowlist;
* ``writer``: a trained module -> an export directory (atomic); ``captioner``: the captioner layout and loader;
* ``checkpoint``: ``mmalign export`` from a Lightning checkpoint and its recipe;
* ``model``: :class:`AlignedModel`, which rebuilds encoders and projectors and embeds anything;
* ``ensemble``: :class:`AlignedEnsemble`, several seeds' exports as one model;
* ``load``: :func:`load`, any export kind; ``embed``: the ``mmalign embed`` command.
"""

from mmalign.export.checkpoint import (
    checkpoint_metrics,
    export,
    export_checkpoint,
    find_recipe_config,
    load_checkpoint,
    load_export_state,
    module_from_recipe,
    read_recipe,
    training_languages,
)
from mmalign.export.embed import embed
from mmalign.export.ensemble import AlignedEnsemble, ensemble_embeddings
from mmalign.export.format import (
    CAPTIONER_FORMAT,
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    ONNX_DIR,
    WEIGHTS_NAME,
    ExportError,
    class_path,
    json_loose,
    json_strict,
    read_config,
    resolve_class,
    sha256_file,
)
from mmalign.export.load import load
from mmalign.export.model import AlignedModel
from mmalign.export.writer import (
    build_export_config,
    encoder_config,
    export_module,
    export_onnx,
    export_state,
    objective_config,
    tower_config,
)

__all__ = [
    "CAPTIONER_FORMAT", "CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "ONNX_DIR", "WEIGHTS_NAME", "AlignedEnsemble",
    "AlignedModel", "ExportError", "build_export_config", "checkpoint_metrics", "class_path", "embed", "encoder_config",
    "ensemble_embeddings", "export", "export_checkpoint", "export_module", "export_onnx", "export_state",
    "find_recipe_config", "json_loose", "json_strict", "load", "load_checkpoint", "load_export_state",
    "module_from_recipe", "objective_config", "read_config", "read_recipe", "resolve_class", "sha256_file",
    "tower_config", "training_languages",
]
