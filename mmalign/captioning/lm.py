"""A frozen transformers language model (causal or seq2seq) for visual-prefix recipes, plus tiny twins.

:class:`FrozenLM` loads any ``AutoModelForCausalLM`` (BLOOMZ, Qwen, Llama...) or
``AutoModelForSeq2SeqLM`` (mT5, mT0...) with its tokenizer, from a hub id, a local directory or a
tiny twin (``tiny:tiny-causal-lm``, ``tiny:tiny-mt5``, listed in :mod:`encoders.registry`). Frozen means
what it means for encoders, with the same implementation (:class:`encoders.frozen.FrozenModule`): no base
weight requires grad, the model stays in eval mode, and base weights are left out of ``state_dict()``.
Gradients still flow *through* the LM to the prefix embeddings (it is not run under ``inference_mode``).
Optional LoRA adapters (peft) are the only LM weights that train and the only ones saved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from encoders.frozen import FrozenModule
from encoders.tiny import resolve_model_path
from encoders.utils import RecordsInitArgs, torch_dtype

_KINDS = ("auto", "causal", "seq2seq")


class FrozenLM(RecordsInitArgs, FrozenModule):
    """A frozen causal or seq2seq LM with its tokenizer, optionally with trainable LoRA adapters.

    Args:
        model_name: Hub id (``bigscience/bloomz-560m``, ``google/mt5-small``), local directory, or
            ``tiny:tiny-causal-lm`` / ``tiny:tiny-mt5`` (random offline twins).
        kind: ``"causal"``, ``"seq2seq"`` or ``"auto"`` (from the config's ``is_encoder_decoder``).
        revision: Hub revision (branch, tag or commit).
        dtype: Weight dtype name (``"float32"``, ``"bfloat16"``, ``"float16"``).
        lora: ``peft.LoraConfig`` keyword arguments (e.g. ``{r: 8, lora_alpha: 16,
            target_modules: [query_key_value]}``); ``None`` keeps the LM entirely frozen.
        tokenizer_name: Tokenizer source when it differs from ``model_name``.
    """

    def __init__(
        self,
        model_name: str,
        kind: str = "auto",
        revision: str | None = None,
        dtype: str = "float32",
        lora: dict[str, Any] | None = None,
        tokenizer_name: str | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        path = resolve_model_path(model_name)
        config = AutoConfig.from_pretrained(path, revision=revision)
        if kind == "auto":
            kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
        self.kind = kind
        auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
        self.model = auto.from_pretrained(path, revision=revision, dtype=torch_dtype(dtype))
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_name or model_name), revision=revision)
        if self.tokenizer.pad_token_id is None:  # e.g. Llama/GPT-2 style tokenizers
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {model_name!r} has no eos token: captions could never end")
        if lora:
            self._add_lora(lora)
        # LoRA weights (injected as ``lora_A``/``lora_B`` modules) are the only ones that train.
        self.freeze(trainable=lambda name: bool(lora) and "lora_" in name)
        if lora and not self.trainable_names():
            raise ValueError(f"LoRA config {lora} matched no module of {model_name!r} (check target_modules)")

    def _add_lora(self, lora: dict[str, Any]) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("LoRA needs peft: pip install 'mmalign[generate]'") from e
        # Injected in place (no PeftModel wrapper): the LM keeps its own class, forward and generate.
        inject_adapter_in_model(LoraConfig(**lora), self.model)

    @property
    def is_seq2seq(self) -> bool:
        return self.kind == "seq2seq"

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings ``[B, T, H]`` of ``input_ids [B, T]``."""
        return self.model.get_input_embeddings()(input_ids)

    def trainable_names(self) -> set[str]:
        """Names of the LoRA weights (empty without LoRA): all that ``state_dict()`` holds."""
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)


# -- tiny offline twins -----------------------------------------------------------------------
def _tiny_corpus() -> list[str]:
    """Words the tiny tokenizer learns merges from: prompts plus emoji names in 14 languages (if available)."""
    from mmalign.data.langs import LANGUAGE_NAMES

    lines = [f"Caption in {name}:" for name in LANGUAGE_NAMES.values()]
    try:
        import emoji

        for data in emoji.EMOJI_DATA.values():
            lines.extend(v.strip(":").replace("_", " ") for k, v in data.items() if isinstance(v, str) and len(k) == 2)
    except ImportError:  # byte-level BPE still encodes any text, just with more tokens
        pass
    return lines


def build_tiny_tokenizer(directory: str | Path, vocab_size: int = 2000) -> Any:
    """Train a byte-level BPE tokenizer offline and save it as a transformers fast tokenizer.

    Special tokens: ``<pad>`` = 0, ``</s>`` = 1 (eos), ``<unk>`` = 2, ``<s>`` = 3 (bos).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(sorted(set(_tiny_corpus())), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>")
    fast.save_pretrained(str(directory))
    return fast


def build_tiny_causal_lm(directory: Path) -> None:
    """A 2-layer, 64-wide random BLOOM (the family of BLOOMZ) with the tiny BPE tokenizer.

    ``initializer_range=0.3`` (not BLOOM's 0.02): with tiny weights a random LM predicts a near-uniform
    next token whatever its input, so no prefix could change its output; larger weights give a peaked,
    input-sensitive random LM on which conditioning is observable.
    """
    from transformers import BloomConfig, BloomForCausalLM

    tok = build_tiny_tokenizer(directory)
    config = BloomConfig(
        vocab_size=len(tok), hidden_size=64, n_layer=2, n_head=4, initializer_range=0.3,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BloomForCausalLM(config).save_pretrained(str(directory))


def build_tiny_mt5(directory: Path) -> None:
    """A 2+2-layer, 64-wide random mT5 (the family of mT0) with the tiny BPE tokenizer (``initializer_factor=0.5``:
    peaked but not saturated logits, see the causal twin)."""
    from transformers import MT5Config, MT5ForConditionalGeneration

    tok = build_tiny_tokenizer(directory)
    config = MT5Config(
        vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        initializer_factor=0.5, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        MT5ForConditionalGeneration(config).save_pretrained(str(directory))
