"""Speech prefix to a frozen LM: frozen Whisper/wav2vec2 frames -> adapter -> prefix embeddings of a frozen LM.

The speech-text stage of S2ST-Omni (a frozen Whisper encoder bridged to a frozen LLM by a small speech
adapter, trained for speech-to-text translation) and SLAM-ASR, built as mBLIP's recipe
(:class:`~mmalign.captioning.PrefixCaptioningModule`) with a speech encoder: the same sequence layout,
loss over target tokens only, frozen LM with optional LoRA, and the same export format. What differs:

* the encoder is a speech encoder (``speech_encoder``; batch key ``speech``, manifest field ``audio``);
  its frames are usually downsampled by the adapter (:class:`~mmalign.captioning.adapter.FrameStackMLP`,
  or :class:`projectors.Resampler` with ``pool: false`` for a fixed number of query tokens), and the
  prefix keeps each clip's own length (padding frames are masked and packed out of the LM's sequence);
* the target is a transcript (``target_field: text``, ``prompt: "Transcribe the {language} speech:"``) or
  a translation (``target_field: text_en``, ``prompt: "Translate the {language} speech into English:"``);
  ``{language}`` is the row's spoken language;
* evaluation adds WER and CER (percent) to loss, perplexity and chrF, per language.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from encoders.base import Encoder
from mmalign.captioning.lm import FrozenLM
from mmalign.captioning.metrics import caption_metrics
from mmalign.captioning.module import PrefixCaptioningModule, ProjectorFactory
from mmalign.data.captions import CaptionDataModule, keep_strings


class SpeechPrefixModule(PrefixCaptioningModule):
    """Speech-to-text through a frozen LM: frozen speech encoder frames -> adapter -> LM prefix.

    Decoder-only LM: ``[speech prefix][prompt][target </s>]``; seq2seq LM: ``[speech prefix][prompt </s>]``
    into the encoder, ``target </s>`` as decoder labels. Labels are ``-100`` on prefix, prompt and padding:
    the loss is next-token cross-entropy over the target tokens (and eos) only.

    Args:
        speech_encoder: Frozen speech encoder with frame tokens (``WhisperSpeechEncoder``,
            ``Wav2Vec2SpeechEncoder``).
        lm: Frozen LM (optionally with LoRA adapters, which train).
        projector: Factory ``(frame_dim, lm_hidden) -> Projector`` giving ``[B, K, lm_hidden]``:
            :class:`~mmalign.captioning.adapter.FrameStackMLP` (``ceil(T / stack)`` tokens per clip) or
            ``projectors.Resampler`` with ``pool: false`` (``num_queries`` tokens).
        prompt: Instruction template; ``{language}`` is the English name of the row's (spoken) language,
            ``{lang}`` its code.
        prompts: Per-language instructions overriding ``prompt`` (e.g. written in each language).
        audio_field: Manifest field of the clip.
        target_field: Manifest field of the target text (``text``: transcript; ``text_en``: translation).
        max_target_tokens: Targets are truncated to this many tokens (before eos).
        eval_generate: Generate greedy transcripts in validation/test and score chrF, WER and CER.
        eval_max_new_tokens: Generation length in evaluation.
        predict_languages: ``predict`` decodes every clip with each of these languages' prompts (default: the row's).
        predict_max_new_tokens: Generation length in ``predict``.
        export_dir: Write the export here when ``fit`` ends.
        optimizer: Optimizer factory over the trainable parameters (adapter, LoRA).
        scheduler: Optional LR scheduler factory (stepped every optimizer step).
    """

    encoder_arg = "speech_encoder"
    input_key = "speech"
    item_noun = "clips"
    output_key = "text"

    def __init__(
        self,
        speech_encoder: Encoder,
        lm: FrozenLM,
        projector: ProjectorFactory,
        prompt: str = "Transcribe the {language} speech:",
        prompts: dict[str, str] | None = None,
        audio_field: str = "audio",
        target_field: str = "text",
        max_target_tokens: int = 64,
        eval_generate: bool = True,
        eval_max_new_tokens: int = 48,
        predict_languages: list[str] | None = None,
        predict_max_new_tokens: int = 64,
        export_dir: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        # The image constructor's arguments are not this one's: skip it (to FrozenBackboneModule) and set up
        # through the shared builder. (A super() call also gives Lightning the frame it reads hparams from.)
        super(PrefixCaptioningModule, self).__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["speech_encoder", "lm", "projector", "optimizer", "scheduler"])
        if not getattr(speech_encoder, "has_tokens", False):
            raise TypeError(f"{type(speech_encoder).__name__} gives no frame tokens; a speech prefix needs them")
        self._build(speech_encoder, lm, projector, prompt=prompt, prompts=prompts, input_field=audio_field,
                    target_field=target_field, max_target_tokens=max_target_tokens, eval_generate=eval_generate,
                    eval_max_new_tokens=eval_max_new_tokens, predict_languages=predict_languages,
                    predict_max_new_tokens=predict_max_new_tokens, export_dir=export_dir)

    @property
    def audio_field(self) -> str:
        return self.input_field

    @torch.no_grad()
    def generate(self, audio: Sequence[Any], lang: str | Sequence[str] = "en", prompt: str | None = None,  # type: ignore[override]
                 max_new_tokens: int = 64, sampling_rate: int | None = None, **generate_kwargs: Any) -> list[str]:
        """Transcribe (or translate, as trained) raw clips; greedy unless ``generate_kwargs`` say otherwise.

        Args:
            audio: Audio file paths or 1-D waveforms (then ``sampling_rate`` is required).
            lang: Spoken language, one for all or one per clip; it picks the instruction prompt.
            prompt: Prompt text overriding the language template.
            max_new_tokens: Longest output in tokens.
            sampling_rate: Rate of waveform items (resampled to the encoder's).
            generate_kwargs: Passed to transformers ``generate`` (``num_beams``, ``do_sample``...).
        """
        kwargs = {} if sampling_rate is None else {"sampling_rate": sampling_rate}
        return self._generate_raw(audio, lang, prompt, max_new_tokens, preprocess_kwargs=kwargs, **generate_kwargs)

    def eval_metrics(self, store: dict[str, dict[str, Any]], stage: str) -> dict[str, float]:
        """Loss, perplexity, chrF, WER and CER per language and overall."""
        return caption_metrics(store, stage, error_rates=True)


class SpeechTextDataModule(CaptionDataModule):
    """Train/val/test manifests -> audio + target-text batches for a :class:`SpeechPrefixModule`.

    Same arguments as :class:`~mmalign.data.datamodule.AlignmentDataModule`. The speech preprocessing
    (decoding, resampling, log-mel or waveform batches) and the two fields read (``audio_field``,
    ``target_field``) come from the model in :meth:`connect`; every row needs a clip and a target text.
    Batches: ``{"meta", "keys": {audio_field, target_field: [texts]}, "inputs": {"speech": ...}}``.
    """

    def connect(self, module: Any) -> None:
        """Bind the model's encoder preprocessing and fields (done automatically in ``setup``)."""
        for attr in ("encoder", "input_key", "input_field", "target_field"):
            if not hasattr(module, attr):
                raise TypeError(f"SpeechTextDataModule needs a prefix-LM model with {attr!r}; got {type(module).__name__}")
        self._towers = {
            module.input_key: (module.input_field, module.encoder.preprocess),
            "target": (module.target_field, keep_strings),
        }


__all__ = ["SpeechPrefixModule", "SpeechTextDataModule"]
