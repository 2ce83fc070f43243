"""What "frozen" means, written once: for the encoders (:class:`encoders.base.Encoder`) and for the
frozen language model of the visual-prefix recipes (:class:`mmalign.captioning.lm.FrozenLM`)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from torch import Tensor, nn


class FrozenModule(nn.Module):
    """An ``nn.Module`` whose pretrained weights never train and never enter a checkpoint.

    After :meth:`freeze`:

    * no parameter requires grad, except those ``trainable`` selects (LoRA adapters of an LM);
    * the module stays in eval mode whatever ``.train()`` is called with (dropout off, batch-norm
      statistics fixed), also when a parent LightningModule switches to training;
    * ``state_dict()`` holds the trainable parameters only (none for an encoder), so checkpoints hold
      projectors and adapters, never multi-GB backbones;
    * ``load_state_dict`` ignores frozen weights and buffers in a checkpoint (they come from the
      pretrained source) and does not report their absence as missing keys, so strict loading of a
      projector checkpoint stays strict about everything else.
    """

    _frozen: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.register_load_state_dict_post_hook(FrozenModule._forget_frozen_keys)

    @property
    def frozen(self) -> bool:
        return self._frozen

    def freeze(self, trainable: Callable[[str], bool] | None = None) -> "FrozenModule":
        """Freeze every parameter, except those whose name (relative to this module) ``trainable`` accepts."""
        for name, p in self.named_parameters():
            p.requires_grad_(trainable is not None and trainable(name))
        self._frozen = True
        nn.Module.train(self, False)
        return self

    def train(self, mode: bool = True) -> "FrozenModule":
        return nn.Module.train(self, False if self._frozen else mode)

    def _frozen_names(self) -> set[str]:
        """Names of the frozen parameters and of all buffers (both come from the pretrained source), under every
        name they have: a tied weight (Whisper's ``proj_out`` is its decoder's token embedding) is one parameter
        with two ``state_dict`` keys, and ``named_parameters()`` lists only the first."""
        frozen = {n for n, p in self.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return frozen | {n for n, _ in self.named_buffers(remove_duplicate=False)}

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict[str, Tensor]:  # type: ignore[override]
        if not self._frozen:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if args:  # torch's deprecated positional form: (destination, prefix, keep_vars)
            destination, prefix, keep_vars = (*args, *(destination, prefix, keep_vars)[len(args):])[:3]
        out = destination if destination is not None else OrderedDict()
        for name, p in self.named_parameters():
            if p.requires_grad:
                out[prefix + name] = p if keep_vars else p.detach()
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D401
        self._load_prefix = prefix
        if self._frozen:
            # Drop frozen weights before the children see them: they come from the pretrained
            # source, never from a checkpoint (which may predate a change of the base model).
            for name in self._frozen_names():
                state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _forget_frozen_keys(module: "FrozenModule", incompatible_keys: Any) -> None:
        # A load_state_dict post-hook: checkpoints never hold frozen weights, so their absence is not a
        # "missing key"; a missing trainable weight (a LoRA adapter) still is.
        if module._frozen:
            prefix = getattr(module, "_load_prefix", "")
            frozen = {prefix + n for n in module._frozen_names()}
            incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in frozen]
