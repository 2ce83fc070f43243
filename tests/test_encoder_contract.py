"""The Encoder contract, checked on every tiny twin of every family in :mod:`encoders.registry`.

A new family is tested by registering it (``ENCODER_FAMILIES`` with its ``tiny`` twins); a test below
fails when an Encoder class in ``encoders/`` is left out of the registry. Family-specific behaviour
(Whisper's 30 s window, timm's pools, CTranslate2 parity...) stays in tests/test_encoders_*.py.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import encoders
from encoders.base import Encoder
from encoders.frozen import FrozenModule
from encoders.registry import ENCODER_FAMILIES, PACKAGED_MODELS, TINY_MODELS, list_encoders, list_models, load_object
from encoders.tiny import known_tiny_models, resolve_model_path
from encoders.utils import dtype_name, torch_dtype

CASES = [(fam.name, tiny) for fam in list_encoders().values() for tiny in fam.tiny]
IDS = [f"{family}-{tiny}" for family, tiny in CASES]
SR = 16_000
TEXTS = ["a cat on the sofa", "ein Hund läuft durch den grünen Park und spielt Fußball", "собака"]


def _raw(modality: str) -> list:
    """Three items of different lengths/sizes, so batches need padding wherever the modality has it."""
    if modality == "text":
        return list(TEXTS)
    if modality == "image":
        rng = np.random.default_rng(0)
        return [rng.integers(0, 256, (40, 52, 3), dtype=np.uint8), rng.random((30, 30)),
                rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)]
    t = np.arange(SR) / SR
    return [(0.3 * np.sin(2 * np.pi * f * t[: int(s * SR)])).astype(np.float32) for s, f in ((1.0, 440), (0.5, 330), (0.7, 550))]


def _inputs(enc: Encoder, items: list) -> dict[str, torch.Tensor]:
    return enc.preprocess(items, sampling_rate=SR) if enc.modality == "speech" else enc.preprocess(items)


@pytest.fixture(scope="module", autouse=True)
def _tiny_dir(tmp_path_factory):
    """Build tiny twins once into a test folder unless the session already chose one."""
    if "MMALIGN_TINY_DIR" in os.environ:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMALIGN_TINY_DIR", str(tmp_path_factory.mktemp("tiny")))
        yield


@pytest.fixture(scope="module")
def built(_tiny_dir):
    """``built(family, tiny)``: the family's encoder on that tiny twin, built once per module."""
    cache: dict[tuple[str, str], Encoder] = {}

    def get(family: str, tiny: str) -> Encoder:
        if (family, tiny) not in cache:
            cache[family, tiny] = ENCODER_FAMILIES[family].cls(f"tiny:{tiny}")
        return cache[family, tiny]

    return get


# -- registry -----------------------------------------------------------------------------------

def test_registry_tables_resolve():
    assert CASES, "no tiny twins registered"
    for fam in list_encoders().values():
        cls = fam.cls
        assert issubclass(cls, Encoder) and cls.modality == fam.modality, fam.name
        assert fam.class_path == f"{cls.__module__}.{cls.__qualname__}"
        assert all(t in TINY_MODELS for t in fam.tiny), fam.name
        if fam.pooling is not None:  # the registered default is the constructor's default
            assert inspect.signature(cls.__init__).parameters[fam.pooling].default == fam.poolings[0], fam.name
    for target in [*TINY_MODELS.values(), *PACKAGED_MODELS.values()]:
        assert callable(load_object(target)), target
    assert set(list_encoders("speech")) == {"whisper", "wav2vec2", "whisper-cascade"}


def test_every_encoder_class_is_registered():
    registered = {fam.class_path for fam in ENCODER_FAMILIES.values()}
    found = set()
    for info in pkgutil.iter_modules(encoders.__path__):
        module = importlib.import_module(f"encoders.{info.name}")
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, Encoder) and obj is not Encoder
                    and obj.__module__ == module.__name__ and not obj.__name__.startswith("_")):
                found.add(f"{obj.__module__}.{obj.__qualname__}")
    assert found == registered


def test_list_models_is_the_same_whatever_was_imported():
    # A fresh interpreter that imports only the registry sees every name, the frozen LMs' twins included.
    code = ("import json, sys; from encoders.registry import list_models; names = list_models(); "
            "assert 'mmalign.captioning.lm' not in sys.modules; "
            "print(json.dumps(names))")
    fresh = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    import mmalign.captioning.lm  # noqa: F401  (used to register two more names as a side effect)

    assert fresh == list_models() == sorted(known_tiny_models() + list_models("packaged"))
    assert {"tiny:tiny-causal-lm", "tiny:tiny-mt5", "tiny:whisper", "packaged:whisper-base"} <= set(fresh)
    assert len(known_tiny_models()) == len(TINY_MODELS) == 13
    with pytest.raises(KeyError, match="known: .*tiny:bert-text"):
        resolve_model_path("tiny:no-such-model")
    assert resolve_model_path("org/model") == "org/model"


def test_dtype_parsing_is_shared():
    for given in ("bfloat16", "bf16", "torch.bfloat16", torch.bfloat16, "BF16"):
        assert torch_dtype(given) is torch.bfloat16 and dtype_name(given) == "bfloat16"
    assert torch_dtype("fp16") is torch.float16 and torch_dtype("half") is torch.float16
    assert torch_dtype(None) is None
    for bad in ("int8", "float8", torch.int64):
        with pytest.raises(ValueError, match="unsupported dtype"):
            torch_dtype(bad)


def test_frozen_module_keeps_trainable_weights_only():
    """The freeze shared with the frozen LM: a LoRA-like subset trains and is all that is saved or loaded."""

    class Backbone(FrozenModule):
        def __init__(self) -> None:
            super().__init__()
            self.base = nn.Linear(3, 3)
            self.lora_a = nn.Linear(3, 1, bias=False)
            self.register_buffer("stat", torch.zeros(3))
            self.drop = nn.Dropout(0.5)

    m = Backbone().freeze(trainable=lambda name: "lora_" in name)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["lora_a.weight"]
    m.train()
    assert not m.training and not m.drop.training
    parent = nn.ModuleDict({"lm": m})
    assert list(parent.state_dict()) == ["lm.lora_a.weight"]
    base = m.base.weight.detach().clone()
    ckpt = {"lm.lora_a.weight": torch.ones(1, 3), "lm.base.weight": torch.full((3, 3), 7.0)}
    parent.load_state_dict(ckpt)  # strict: frozen weights may be absent, and are never loaded
    assert torch.equal(m.lora_a.weight, torch.ones(1, 3)) and torch.equal(m.base.weight, base)
    missing = parent.load_state_dict({}, strict=False).missing_keys
    assert missing == ["lm.lora_a.weight"]  # a missing trainable weight is still reported


def test_frozen_module_with_tied_weights_loads_strictly():
    """A tied weight (Whisper's proj_out is its decoder's token embedding) has two state_dict keys but one parameter:
    neither key is saved, and neither is reported missing when a projector checkpoint is loaded strictly."""

    class Tied(FrozenModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.embed.weight

    parent = nn.ModuleDict({"enc": Tied().freeze(), "head": nn.Linear(3, 2)})
    assert list(parent.state_dict()) == ["head.weight", "head.bias"]
    result = parent.load_state_dict(parent.state_dict())  # strict
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_cascade_tower_checkpoint_roundtrip():
    """The ASR cascade (a full Whisper with tied output weights) inside a module: its projector checkpoint loads."""
    from encoders.cascade import WhisperCascadeEncoder
    from projectors import CascadeResidual

    enc = WhisperCascadeEncoder("tiny:whisper-asr", text_encoder="encoders.HFTextEncoder", output="decoder+transcript",
                                text_encoder_args={"model_name_or_path": "tiny:bert-text"})
    tied = [n for n, _ in enc.named_parameters(remove_duplicate=False)]
    module = nn.ModuleDict({"encoder": enc, "projector": CascadeResidual(enc.output_dim, enc.text.output_dim)})
    state = module.state_dict()
    assert all(k.startswith("projector.") for k in state) and len(tied) > len(list(enc.named_parameters()))
    assert module.load_state_dict(state).missing_keys == []


# -- the contract, per family and tiny twin ----------------------------------------------------

@pytest.mark.parametrize("family,tiny", CASES, ids=IDS)
def test_output_shapes(built, family, tiny):
    enc = built(family, tiny)
    assert enc.modality == ENCODER_FAMILIES[family].modality
    inputs = _inputs(enc, _raw(enc.modality))
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in inputs.values())
    out = enc(inputs)
    assert out.pooled.shape == (3, enc.output_dim) and torch.isfinite(out.pooled).all()
    assert not torch.allclose(out.pooled[0], out.pooled[1])  # the backbone is really used
    assert (enc.token_dim is not None) == enc.has_tokens
    if enc.has_tokens:
        B, T, D = out.tokens.shape
        assert (B, D) == (3, enc.token_dim)
        assert out.mask.shape == (B, T) and out.mask.dtype == torch.bool and out.mask.any(dim=1).all()
    else:
        assert out.tokens is None and out.mask is None


@pytest.mark.parametrize("family,tiny", CASES, ids=IDS)
def test_padding_does_not_change_an_item(built, family, tiny):
    """A padded batch gives every item the pooled vector (and real tokens) it gets alone."""
    enc = built(family, tiny)
    items = _raw(enc.modality)
    batch = enc(_inputs(enc, items))
    if enc.modality != "image":  # images are resized, never padded; text and speech must really pad here
        assert (batch.mask.sum(dim=1) < batch.mask.shape[1]).any()
    for i, item in enumerate(items):
        alone = enc(_inputs(enc, [item]))
        torch.testing.assert_close(batch.pooled[i], alone.pooled[0], atol=1e-5, rtol=1e-4)
        if enc.has_tokens:
            n = int(alone.mask[0].sum())
            assert int(batch.mask[i].sum()) == n
            torch.testing.assert_close(batch.tokens[i][batch.mask[i]], alone.tokens[0][alone.mask[0]], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family,tiny", CASES, ids=IDS)
def test_frozen_in_a_parent_module(built, family, tiny):
    from mmalign.training.base import FrozenBackboneModule

    enc = built(family, tiny)
    assert sum(p.numel() for p in enc.parameters()) > 0
    assert not any(p.requires_grad for p in enc.parameters())
    parent = nn.ModuleDict({"encoder": enc, "head": nn.Linear(enc.output_dim, 4)})
    parent.train()
    assert parent["head"].training and not any(m.training for m in enc.modules())
    # What AlignmentModule hands the optimizer: the head only.
    group = FrozenBackboneModule.trainable_parameters(parent)
    assert {id(p) for p in group} == {id(p) for p in parent["head"].parameters()}
    state = parent.state_dict()
    assert enc.state_dict() == {} and sorted(state) == ["head.bias", "head.weight"]
    parent.load_state_dict(state)  # strict: the encoder's weights are not "missing"
    out = enc(_inputs(enc, _raw(enc.modality)[:2]))
    assert not out.pooled.is_inference()  # outputs leave inference mode, so a projector can train on them
    parent["head"](out.pooled).sum().backward()
    assert parent["head"].weight.grad is not None and all(p.grad is None for p in enc.parameters())
    parent.eval()


@pytest.mark.parametrize("family,tiny", CASES, ids=IDS)
def test_cache_key_stable_and_keyed_by_pooling_and_dtype(built, family, tiny):
    fam, enc = ENCODER_FAMILIES[family], built(family, tiny)
    assert enc.cache_key == enc.cache_key and enc.cache_key.startswith(type(enc).__name__ + "-")
    assert fam.cls(f"tiny:{tiny}").cache_key == enc.cache_key
    keys = {enc.cache_key}
    low = fam.cls(f"tiny:{tiny}", dtype="bfloat16")
    assert low.cache_key not in keys, "bf16 features must not be served from an fp32 cache"
    keys.add(low.cache_key)
    if fam.pooling is not None:
        assert enc.init_args()[fam.pooling] == fam.poolings[0]
        others = 0
        for value in fam.poolings[1:]:
            try:
                other = fam.cls(f"tiny:{tiny}", **{fam.pooling: value})
            except ValueError:  # e.g. CLS pooling of a model without a CLS token
                continue
            assert other.cache_key not in keys, value
            keys.add(other.cache_key)
            others += 1
        assert others > 0, f"no other pooling of {fam.poolings} builds on tiny:{tiny}"


@pytest.mark.parametrize("family,tiny", CASES, ids=IDS)
def test_rebuilt_from_recorded_init_args_is_identical(built, family, tiny):
    """Save/load identity: the ``init_args`` an export writes to config.json rebuild the same encoder."""
    enc = built(family, tiny)
    recorded = json.loads(json.dumps(enc.init_args()))  # through JSON, as config.json holds it
    # The record has exactly the constructor's arguments: exports written before keep loading.
    assert set(recorded) == set(inspect.signature(type(enc).__init__).parameters) - {"self"}
    rebuilt = type(enc)(**recorded)
    assert rebuilt.spec() == enc.spec() and rebuilt.cache_key == enc.cache_key
    assert rebuilt.init_args() == recorded
    inputs = _inputs(enc, _raw(enc.modality))
    a, b = enc(inputs), rebuilt(inputs)
    torch.testing.assert_close(b.pooled, a.pooled, atol=0, rtol=0)
    if enc.has_tokens:
        torch.testing.assert_close(b.tokens, a.tokens, atol=0, rtol=0)
        assert torch.equal(b.mask, a.mask)
