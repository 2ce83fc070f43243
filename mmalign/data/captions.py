"""Image-caption batches for visual-prefix recipes (:class:`mmalign.captioning.PrefixCaptioningModule`).

The manifests are the usual ones (``image``, ``text`` = caption in ``lang``); the batch is the usual raw
batch too: ``{"meta": {"id", "concept", "lang"}, "keys": {"image": [...], "text": [captions]},
"inputs": {"image": pixel tensors}}``. Prompts ("Caption in German:") and tokenisation belong to the
model (they depend on its LM), so captions travel as strings.
"""

from __future__ import annotations

from typing import Any, Sequence

from mmalign.data.datamodule import AlignmentDataModule


def keep_strings(items: Sequence[Any]) -> list[str]:
    """The "preprocessing" of the caption field: captions stay strings (module-level so workers can pickle it)."""
    return [str(x) for x in items]


class CaptionDataModule(AlignmentDataModule):
    """Train/val/test manifests -> image + caption batches for a prefix captioning model.

    Same arguments as :class:`~mmalign.data.datamodule.AlignmentDataModule`; the image preprocessing
    and the two fields read (``image_field``, ``caption_field``) are taken from the model in
    :meth:`connect`. Every row needs an image and a caption (also for ``predict``, whose captions
    become the references written next to the generations).
    """

    def connect(self, module: Any) -> None:
        """Bind the model's image encoder preprocessing and fields (done automatically in ``setup``)."""
        for attr in ("image_encoder", "image_field", "caption_field"):
            if not hasattr(module, attr):
                raise TypeError(f"CaptionDataModule needs a prefix captioning model with {attr!r}; got {type(module).__name__}")
        self._towers = {
            "image": (module.image_field, module.image_encoder.preprocess),
            "caption": (module.caption_field, keep_strings),
        }
