"""ASR cascade as a speech encoder: Whisper transcribes the clip, a frozen text encoder embeds the transcript.

This is the baseline a trained speech projector has to beat: it needs no training at all, and it lives in the
text tower's space by construction. As an :class:`~encoders.base.Encoder` it plugs in wherever a speech encoder
does: a recipe tower (with a :class:`projectors.Identity` projector, so the tower's output *is* the text
encoder's embedding of the transcript), ``mmalign eval`` (``configs/offline/sonar_speech_cascade.yaml``), and the
feature cache (its :attr:`cache_key` names the ASR model, the decoding options and the text encoder's own key).

    enc = WhisperCascadeEncoder("openai/whisper-small", text_encoder="encoders.UniversalSentenceEncoderM")
    enc.transcribe(["clip.wav"])                      # -> [" The red apple."]
    enc(enc.preprocess(["clip.wav"])).pooled          # [1, 512]: USE-m of the transcript

By default Whisper runs as trained: one 30 s log-mel window per clip. ``pad_seconds=s`` instead runs the encoder
on the clip plus ``s`` seconds of silence only (positional embeddings sliced, each clip on its own so the result
never depends on the batch), 3-4x cheaper for short clips on a CPU. The silence matters: windows cropped to the
clip itself make the decoder loop (an espeak-ng "the red apple is on the table" came back eight times over); with
3 s of silence it transcribed that clip as the 30 s window does. Decoding is greedy by default; ``language`` is a
hint (the language token is forced), ``None`` to let Whisper detect the language of each clip, a list of candidate
languages, or ``"row"``: each clip's own language, the ``lang`` of its manifest row (or the ``lang=`` of an export's
``embed_speech``), forced as a hint. That is what SONAR's per-language speech encoders assume (the language of the
speech is known); rows whose language Whisper does not know (``und``) are detected. ``num_hypotheses=K`` (with
``num_beams >= K``) embeds the K best beam-search hypotheses and averages them by their scores: a "soft" transcript
that keeps a misheard name near its likely readings (docs/results_whisper_decoding.md).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from encoders.audio import load_batch
from encoders.base import Encoder, EncoderOutput, Modality
from encoders.registry import load_object
from encoders.tiny import resolve_model_path
from encoders.utils import quiet_transformers, torch_dtype

#: What the cascade tower outputs: the transcript's embedding, or the decoder's state beside it.
OUTPUTS = ("transcript", "decoder+transcript")

#: ``language=`` value that takes each clip's language from its row.
ROW_LANGUAGE = "row"

#: What an empty transcript is embedded as (the text encoders refuse blank strings).
EMPTY_TRANSCRIPT = "-"


#: The package whose classes ``text_encoder`` may name by string: the string comes from recipes and shared exports,
#: and importing a module runs it, so nothing outside the project's encoders is imported (pass a class object instead).
TEXT_ENCODER_PACKAGE = "encoders"


def text_encoder_class(text_encoder: "str | type") -> type:
    """The text :class:`~encoders.base.Encoder` class ``text_encoder`` names; a string is checked BEFORE any import
    (a dotted path under :data:`TEXT_ENCODER_PACKAGE`, no dunder part), a class object is taken as given.

    Raises:
        TypeError: Not such a path, or not a text encoder class.
    """
    if isinstance(text_encoder, type):
        cls: Any = text_encoder
    else:
        parts = text_encoder.split(".") if isinstance(text_encoder, str) else []
        if (len(parts) < 2 or parts[0] != TEXT_ENCODER_PACKAGE
                or not all(p.isidentifier() and not p.startswith("__") for p in parts)):
            raise TypeError(f"text_encoder {text_encoder!r}: refusing to import it; a cascade names its text encoder by "
                            f"a class path under {TEXT_ENCODER_PACKAGE}. (e.g. encoders.UniversalSentenceEncoderM); "
                            "pass the class itself to use one from elsewhere")
        cls = load_object(text_encoder)
    if not (isinstance(cls, type) and issubclass(cls, Encoder)) or cls.modality != Modality.TEXT:
        raise TypeError(f"text_encoder {text_encoder!r} is not a text Encoder class")
    return cls


class WhisperCascadeEncoder(Encoder):
    """Speech -> Whisper transcript -> frozen text encoder embedding.

    Args:
        model_name_or_path: A ``WhisperForConditionalGeneration`` checkpoint: hub id (``openai/whisper-small``),
            local directory, ``packaged:whisper-base`` or ``tiny:whisper``. It needs its tokenizer files
            (hub checkpoints and :func:`encoders.convert_ct2.packaged_whisper_base` have them).
        text_encoder: ``class_path`` of the frozen text encoder that embeds the transcripts (under ``encoders.``:
            see :func:`text_encoder_class`), or the class itself.
        text_encoder_args: Its ``init_args``.
        language: Language hint (``"en"``, ``"de"``...: the language token is forced), ``None`` (detected per clip
            among all of Whisper's languages) or a list of candidates (``[en, de, es]``: detected per clip among
            those only, which keeps short clips from being decoded as a language the data never holds) or ``"row"``
            (each clip's own language: :attr:`reads_language`, so the collator, the feature cache and exports hand
            :meth:`preprocess` the rows' ``lang``; a code Whisper lacks, or none, is detected).
        task: ``"transcribe"`` or ``"translate"`` (Whisper's translation into English).
        max_new_tokens: Decoding budget per clip.
        num_beams: 1 is greedy decoding.
        num_hypotheses: The transcript embedding is the mean of this many beam-search hypotheses' embeddings,
            weighted by the softmax of their length-normalised log-probabilities (an N-best "soft" cascade: a name
            Whisper is unsure of still lands near its likely readings; needs ``num_beams >= num_hypotheses``,
            rescaled to the hypotheses' mean norm; the search stops once ``num_beams`` hypotheses have ended).
            1 (the default) embeds the single best transcript.
            :meth:`transcribe` and the decoder states always read the best hypothesis.
        max_seconds: Clips are cut to this length (at most 30 s, one Whisper window).
        pad_seconds: ``None`` for the 30 s window; else the window is the clip plus this much silence.
        dtype: Whisper's weights and compute dtype.
        revision: Hub revision, recorded in :meth:`spec`.
        output: ``"transcript"``: the text encoder's embedding of the transcript (``output_dim`` = the text
            encoder's). ``"decoder+transcript"``: ``[decoder state, transcript embedding]``, the mean of Whisper's
            last decoder hidden state over the transcript's own tokens (the prompt's tokens are read, not
            averaged; an empty transcript takes the state at its end token), concatenated with the same embedding
            (``output_dim`` = Whisper's ``d_model`` + the text encoder's): what a trained
            :class:`projectors.CascadeResidual` corrects the cascade from.
    """

    modality = Modality.SPEECH
    has_tokens = False
    token_dim = None
    sampling_rate = 16_000
    min_audio_samples = 400  # one 25 ms STFT window, as WhisperSpeechEncoder
    #: True with ``language="row"``: :meth:`preprocess` takes ``languages`` (one code per item).
    reads_language = False

    def __init__(
        self,
        model_name_or_path: str,
        text_encoder: str = "encoders.UniversalSentenceEncoderM",
        text_encoder_args: dict[str, Any] | None = None,
        language: str | list[str] | None = None,
        task: str = "transcribe",
        max_new_tokens: int = 96,
        num_beams: int = 1,
        num_hypotheses: int = 1,
        max_seconds: float = 30.0,
        pad_seconds: float | None = None,
        dtype: str = "float32",
        revision: str | None = None,
        output: str = "transcript",
    ) -> None:
        super().__init__()
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        cls = text_encoder_class(text_encoder)  # checked before anything is loaded
        if task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', got {task!r}")
        if not 0 < max_seconds <= 30.0:
            raise ValueError(f"max_seconds must be in (0, 30] (one Whisper window), got {max_seconds}")
        if pad_seconds is not None and not 0 <= pad_seconds <= 30.0:
            raise ValueError(f"pad_seconds must be None or in [0, 30], got {pad_seconds}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError(f"max_new_tokens and num_beams must be positive, got {max_new_tokens}, {num_beams}")
        if not 1 <= num_hypotheses <= num_beams:
            raise ValueError(f"num_hypotheses must be in [1, num_beams={num_beams}] (the beam search returns at most "
                             f"num_beams hypotheses), got {num_hypotheses}")
        path = resolve_model_path(model_name_or_path)
        kwargs: dict[str, Any] = {"revision": revision} if revision else {}
        try:
            self.processor = WhisperProcessor.from_pretrained(path, **kwargs)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(f"{model_name_or_path!r} has no usable Whisper tokenizer/feature extractor ({e}); the "
                             "cascade needs a full Whisper checkpoint with its tokenizer files") from e
        if len(self.processor.tokenizer) < 2:  # transformers builds an empty tokenizer when the files are missing
            raise ValueError(f"{model_name_or_path!r} has no usable Whisper tokenizer (no tokenizer files); the "
                             "cascade needs a full Whisper checkpoint with its tokenizer files")
        with quiet_transformers():
            self.asr = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs).eval()
        self.sampling_rate = int(self.processor.feature_extractor.sampling_rate)
        gen = self.asr.generation_config
        if isinstance(language, (list, tuple)):
            if not language or not all(isinstance(c, str) for c in language):
                raise ValueError(f"language must be a code, None or a non-empty list of codes, got {language!r}")
            language = list(language)
            self._init_args["language"] = language
        self.reads_language = language == ROW_LANGUAGE
        for code in language if isinstance(language, list) else [] if self.reads_language else [language]:
            if code is not None and getattr(gen, "lang_to_id", None) and f"<|{code}|>" not in gen.lang_to_id:
                raise ValueError(f"Whisper {model_name_or_path!r} has no language {code!r}")
        self.text = cls(**(text_encoder_args or {}))
        self.decoder_dim = int(self.asr.config.d_model) if output == "decoder+transcript" else 0
        self.output_dim = self.decoder_dim + int(self.text.output_dim)
        self.freeze()

    def spec(self) -> dict[str, Any]:
        # The text encoder's own cache key carries its weights' identity (package version, pooling...).
        spec = {**super().spec(), **self._init_args, "text_encoder_key": self.text.cache_key}
        if spec.get("num_hypotheses") == 1:  # the default leaves the keys of caches filled before it existed as they were
            del spec["num_hypotheses"]
        return spec

    # -- data -----------------------------------------------------------------------------
    def preprocess(self, items: Sequence[Any], sampling_rate: int | None = None,
                   languages: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Decode/resample ``items`` (paths or 1-D waveforms) into log-mel ``input_features [B, n_mels, F]``.

        30 s windows (``F = 3000``) by default; with ``pad_seconds`` each clip gets its silence margin, the batch is
        padded to its longest clip and ``feature_lengths [B]`` says how many frames are each clip's own.
        With ``language="row"``, ``languages`` (one code per item; ``None``: none known) become ``language_ids [B]``:
        Whisper's language token of each clip, ``-1`` where Whisper has no such language (detected). Without
        ``language="row"`` they are not read (the constructor's ``language`` decides).
        """
        if languages is not None and len(languages) != len(items):
            raise ValueError(f"languages: {len(languages)} codes for {len(items)} items")
        out = self._features(items, sampling_rate)
        if self.reads_language:
            known = getattr(self.asr.generation_config, "lang_to_id", None) or {}
            ids = [known.get(f"<|{c}|>", -1) if isinstance(c, str) else -1 for c in (languages or [None] * len(items))]
            out["language_ids"] = torch.tensor(ids, dtype=torch.long)
        return out

    def _features(self, items: Sequence[Any], sampling_rate: int | None) -> dict[str, Tensor]:
        waves = load_batch(items, self.sampling_rate, sampling_rate=sampling_rate, min_samples=self.min_audio_samples)
        max_samples = int(round(self._init_args["max_seconds"] * self.sampling_rate))
        waves = [w[:max_samples] for w in waves]
        fe = self.processor.feature_extractor
        pad = self._init_args["pad_seconds"]
        if pad is None:
            feats = fe(waves, sampling_rate=self.sampling_rate, return_tensors="pt", padding="max_length")["input_features"]
            return {"input_features": feats.float()}
        n_pad = int(round(pad * self.sampling_rate))
        waves = [np.concatenate([w, np.zeros(min(n_pad, fe.n_samples - len(w)), np.float32)]) for w in waves]
        longest = max(len(w) for w in waves)
        feats = fe(waves, sampling_rate=self.sampling_rate, return_tensors="pt", padding="max_length",
                   max_length=longest)["input_features"]
        lengths = [min(len(w) // fe.hop_length, feats.shape[-1]) // 2 * 2 for w in waves]  # even: conv2 stride
        return {"input_features": feats.float(), "feature_lengths": torch.tensor(lengths, dtype=torch.long)}

    # -- model ----------------------------------------------------------------------------
    def _encoder_states(self, feats: Tensor) -> Tensor:
        """Whisper's encoder on ``[1, n_mels, F]`` log-mel frames of any even ``F <= 3000`` (no padding inside)."""
        enc = self.asr.model.encoder
        x = torch.nn.functional.gelu(enc.conv1(feats))
        x = torch.nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]].to(x.dtype)
        for layer in enc.layers:
            x = layer(x, None)
        return enc.layer_norm(x)

    def transcribe_features(self, inputs: dict[str, Tensor], language: str | None = "default") -> list[str]:
        """Transcripts of a :meth:`preprocess` batch (stripped; may be empty).

        Args:
            language: Overrides the constructor's hint for this call (``None`` detects); ``"default"`` keeps it.
        """
        return self.decode_features(inputs, language, states=False)[0]

    def decode_features(self, inputs: dict[str, Tensor], language: str | list[str] | None = "default",
                        states: bool = True) -> tuple[list[str], Tensor | None]:
        """Transcripts of a :meth:`preprocess` batch and, with ``states``, ``[B, d_model]`` float32: the mean of the
        decoder's last hidden state over each transcript's own (non-special) tokens, or the state at its end token
        when there are none. ``language`` as in :meth:`transcribe_features` (a list: candidates, as in the
        constructor; ``"row"``: the batch's ``language_ids``). With ``num_hypotheses > 1`` these are the best
        hypothesis's (:meth:`decode_hypotheses` has them all)."""
        texts, pooled, _, _ = self._decode(inputs, language, states)
        return texts, pooled

    def decode_hypotheses(self, inputs: dict[str, Tensor], language: str | list[str] | None = "default"
                          ) -> tuple[list[list[str]], Tensor]:
        """The ``num_hypotheses`` beam-search transcripts of each clip, best first, and their weights ``[B, K]``
        (softmax of the length-normalised log-probabilities; ``[[t]]`` and ones when ``num_hypotheses`` is 1)."""
        texts, _, hyps, weights = self._decode(inputs, language, states=False)
        return (hyps, weights) if hyps else ([[t] for t in texts], torch.ones(len(texts), 1))

    def _decode(self, inputs: dict[str, Tensor], language: str | list[str] | None, states: bool
                ) -> tuple[list[str], Tensor | None, list[list[str]], Tensor | None]:
        from transformers.modeling_outputs import BaseModelOutput

        a = self._init_args
        k = int(a.get("num_hypotheses", 1))
        language = a["language"] if language == "default" else language
        options = dict(task=a["task"], max_new_tokens=a["max_new_tokens"], num_beams=a["num_beams"], do_sample=False,
                       return_timestamps=False)
        feats = inputs["input_features"].to(self.device, dtype=self.asr.dtype)
        texts: list[str] = []
        pooled: list[Tensor] = []
        hyps: list[list[str]] = []
        weights: list[Tensor] = []
        with torch.inference_mode(), quiet_transformers():
            if "feature_lengths" in inputs:  # one clip at a time: no padding frames
                windows = [feats[i:i + 1, :, :n] for i, n in enumerate(inputs["feature_lengths"].tolist())]
                encoded = [self._encoder_states(w) for w in windows]
            else:
                encoded = [self.asr.model.encoder(feats).last_hidden_state]
            at = 0
            for enc in encoded:  # the whole sequence: prompt (start, language, task tokens), transcript, end
                if language == ROW_LANGUAGE:
                    lang = self._row_languages(enc, inputs.get("language_ids"), at)
                else:
                    lang = self._pick_language(enc, language) if isinstance(language, list) else language
                at += len(enc)
                if k > 1:
                    ids, w = self._n_best(enc, lang, k)
                    n_best = [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
                    hyps += [n_best[i:i + k] for i in range(0, len(n_best), k)]
                    weights.append(w)
                    ids = ids[::k]  # the best hypothesis of each clip
                else:
                    ids = self.asr.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc), return_dict_in_generate=True,
                                            language=lang, **options).sequences
                texts += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
                if states:
                    pooled.append(self._decoder_mean(ids, enc))
        return texts, torch.cat(pooled) if states else None, hyps, torch.cat(weights) if weights else None

    def _n_best(self, encoder_states: Tensor, lang: str | list[str] | None, k: int) -> tuple[Tensor, Tensor]:
        """Beam search returning ``k`` hypotheses per clip: ids ``[B * k, L]`` (clip-major, best first) and weights
        ``[B, k]``. Whisper's own ``generate`` returns one sequence per beam search, so this runs the generic
        beam search on the prompt Whisper builds (start, language, task, no-timestamps; the checkpoint's
        generation config supplies the suppressed tokens): Whisper's ``generate(num_beams=..., early_stopping=True)``
        gives the same best hypothesis. ``early_stopping``: the search ends once ``num_beams`` hypotheses have
        ended, instead of running hallucinated loops to the token limit: on espeak-ng names that is 2-2.5x faster
        for the same speech->text R@1 (docs/results_whisper_decoding.md)."""
        from transformers import GenerationMixin
        from transformers.modeling_outputs import BaseModelOutput

        a, gen, tok = self._init_args, self.asr.generation_config, self.processor.tokenizer
        n, known = len(encoder_states), getattr(gen, "lang_to_id", None) or {}
        if lang is None and known:  # detected, as Whisper's generate does when no language is given
            lang = self._pick_language(encoder_states, sorted(c[2:-2] for c in known))
        codes = [lang] * n if isinstance(lang, str) or lang is None else list(lang)
        task = tok.convert_tokens_to_ids(f"<|{a['task']}|>")
        no_ts = getattr(gen, "no_timestamps_token_id", None)
        prompts = [[gen.decoder_start_token_id] + ([known[f"<|{c}|>"]] if c and f"<|{c}|>" in known else [])
                   + [task] + ([no_ts] if no_ts is not None else []) for c in codes]
        if len({len(p) for p in prompts}) > 1:  # some clips without a language token: one search each
            out = [self._n_best(encoder_states[i:i + 1], codes[i], k) for i in range(n)]
            return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
        out = GenerationMixin.generate(
            self.asr, encoder_outputs=BaseModelOutput(last_hidden_state=encoder_states),
            decoder_input_ids=torch.tensor(prompts, device=encoder_states.device), max_new_tokens=a["max_new_tokens"],
            num_beams=a["num_beams"], num_return_sequences=k, early_stopping=True, do_sample=False,
            return_dict_in_generate=True, output_scores=True)
        return out.sequences, torch.softmax(out.sequences_scores.float().view(n, k), dim=-1)

    def _pick_language(self, encoder_states: Tensor, candidates: list[str]) -> str | list[str]:
        """Whisper's language detection (the language token's logits after the start token) restricted to
        ``candidates``: one code per clip (a list for a batch of several)."""
        tokens = [self.asr.generation_config.lang_to_id[f"<|{c}|>"] for c in candidates]
        start = torch.full((len(encoder_states), 1), self.asr.generation_config.decoder_start_token_id,
                           dtype=torch.long, device=encoder_states.device)
        logits = self.asr(encoder_outputs=(encoder_states,), decoder_input_ids=start).logits[:, -1, tokens]
        picked = [candidates[int(i)] for i in logits.argmax(-1)]
        return picked[0] if len(picked) == 1 else picked

    def _row_languages(self, encoder_states: Tensor, language_ids: Tensor | None, at: int) -> str | list[str]:
        """Each clip's own language (``language_ids[at:at + B]``); clips without one are detected."""
        gen = self.asr.generation_config
        by_id = {v: k[2:-2] for k, v in (getattr(gen, "lang_to_id", None) or {}).items()}
        n = len(encoder_states)
        ids = [-1] * n if language_ids is None else language_ids[at:at + n].tolist()
        codes: list[str | None] = [by_id.get(int(i)) for i in ids]
        missing = [j for j, c in enumerate(codes) if c is None]
        if missing and by_id:
            picked = self._pick_language(encoder_states[missing], sorted(by_id.values()))
            for j, c in zip(missing, [picked] if isinstance(picked, str) else picked):
                codes[j] = c
        if any(c is None for c in codes):  # a checkpoint without language tokens: nothing to force
            return None  # type: ignore[return-value]
        return codes[0] if n == 1 else codes  # type: ignore[return-value]

    def _decoder_mean(self, ids: Tensor, encoder_states: Tensor) -> Tensor:
        """Decoder states of the generated ``ids`` (prompt included: every token is read in its context)."""
        hidden = self.asr.model.decoder(input_ids=ids, encoder_hidden_states=encoder_states).last_hidden_state.float()
        # [B, L]: Whisper's vocabulary puts every special token (end/padding, start, language, task, timestamps)
        # at or after the end token
        text = ids < self.asr.generation_config.eos_token_id
        out = []
        for b in range(len(ids)):
            if text[b].any():
                out.append(hidden[b][text[b]].mean(0))
            else:  # nothing transcribed: the state at the first end token (or the last position)
                eos = (ids[b] == self.asr.generation_config.eos_token_id).nonzero()[:, 0]
                out.append(hidden[b, int(eos[0]) if len(eos) else ids.shape[1] - 1])
        return torch.stack(out)

    def transcribe(self, items: Sequence[Any], sampling_rate: int | None = None, language: str | None = "default",
                   languages: Sequence[str] | None = None) -> list[str]:
        """Whisper's transcripts of ``items`` (paths or waveforms); ``language`` as in :meth:`transcribe_features`,
        ``languages`` (one code per item) as in :meth:`preprocess`."""
        inputs = self.preprocess(items, sampling_rate=sampling_rate, languages=languages)
        return self.transcribe_features(inputs, language=language)

    def embed_transcripts(self, texts: Sequence[str]) -> Tensor:
        """``[B, D]`` text-encoder embeddings of transcripts (an empty one is embedded as :data:`EMPTY_TRANSCRIPT`)."""
        texts = [t if t.strip() else EMPTY_TRANSCRIPT for t in texts]
        return self.text.encode(self.text.preprocess(texts)).pooled.float()

    def embed_hypotheses(self, hypotheses: Sequence[Sequence[str]], weights: Tensor) -> Tensor:
        """``[B, D]``: each clip's N-best "soft" transcript, the ``weights``-weighted mean of its hypotheses'
        embeddings (:meth:`decode_hypotheses`), rescaled to their mean norm so it stays on the text encoder's scale."""
        k = len(hypotheses[0])
        emb = self.embed_transcripts([t for h in hypotheses for t in h]).view(len(hypotheses), k, -1)
        mean = (weights.to(emb).unsqueeze(-1) * emb).sum(1)
        return torch.nn.functional.normalize(mean, dim=-1) * emb.norm(dim=-1).mean(1, keepdim=True)

    def encode(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        texts, states, hyps, weights = self._decode(inputs, "default", states=self.decoder_dim > 0)
        pooled = (self.embed_hypotheses(hyps, weights) if hyps else self.embed_transcripts(texts)).to(self.device)
        if states is not None:
            pooled = torch.cat([states.to(pooled), pooled], dim=-1)
        return EncoderOutput(pooled=pooled)


__all__ = ["EMPTY_TRANSCRIPT", "OUTPUTS", "ROW_LANGUAGE", "WhisperCascadeEncoder"]
