"""mBLIP-style visual prefix captioning: frozen image encoder -> projector -> K prefix embeddings of a frozen LM.

mBLIP (Geigle et al., 2023, "mBLIP: Efficient Bootstrapping of Multilingual Vision-LLMs") re-aligns an image
encoder to a multilingual LLM by training only a Q-Former/projection (plus optional LoRA) with a captioning
loss over many languages. Here the image tokens of a frozen :class:`~encoders.base.Encoder` pass through a
projector (:class:`projectors.Resampler` with ``pool=False``, or :class:`projectors.TokenMLP`) into ``K`` prefix
embeddings of a frozen :class:`~mmalign.captioning.lm.FrozenLM`:

* decoder-only LM: ``[prefix K][prompt][caption </s>]``; labels are ``-100`` on prefix, prompt and padding;
* seq2seq LM: ``[prefix K][prompt]`` into the encoder, ``caption </s>`` as decoder labels.

The language is given in the prompt (``"Caption in German:"``). The loss is next-token cross-entropy over the
caption tokens only. Checkpoints and exports hold the projector (and LoRA) weights only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from encoders.base import Encoder, EncoderOutput
from mmalign.data.langs import language_name
from mmalign.training.base import FrozenBackboneModule
from mmalign.captioning.layout import IGNORE, CaptionLoss, LMInputs, build_lm_inputs, caption_token_losses
from mmalign.captioning.lm import FrozenLM
from mmalign.captioning.metrics import caption_metrics, merge_eval_stores
from mmalign.export.format import CAPTIONER_FORMAT as EXPORT_FORMAT
from projectors.base import Projector

ProjectorFactory = Callable[[int, int], Projector]
__all__ = ["EXPORT_FORMAT", "IGNORE", "CaptionLoss", "LMInputs", "PrefixCaptioningModule", "build_lm_inputs",
           "caption_token_losses"]


class PrefixCaptioningModule(FrozenBackboneModule):
    """Visual prefix captioning with a frozen image encoder and a frozen multilingual LM.

    It is also the base of every prefix-LM recipe: the encoder is any token encoder, named by the class
    attributes :attr:`encoder_arg` (constructor argument and attribute, ``image_encoder`` here) and
    :attr:`input_key` (batch key of its raw inputs and cached features, ``image``);
    :class:`mmalign.captioning.speech.SpeechPrefixModule` is the speech subclass (Whisper/wav2vec2 frames,
    transcripts or translations, WER). ``self.encoder`` is the encoder whatever its argument's name.

    Args:
        image_encoder: Frozen image encoder; its tokens (or pooled vector) feed the projector.
        lm: Frozen LM (optionally with LoRA adapters, which train).
        projector: Factory ``(in_dim, lm_hidden) -> Projector`` returning ``[B, K, lm_hidden]`` prefix
            tokens (``Resampler(pool=False)``, :class:`projectors.TokenMLP`) or ``[B, lm_hidden]`` (a 1-token prefix).
            ``in_dim`` is the encoder's ``token_dim`` (``output_dim`` when it has none) for token projectors.
        prompt: Prompt template; ``{language}`` is the English language name, ``{lang}`` the code.
        prompts: Per-language prompts overriding ``prompt`` (e.g. prompts written in each language).
        image_field: Manifest field of the image.
        caption_field: Manifest field of the caption.
        max_caption_tokens: Captions are truncated to this many tokens (before eos).
        eval_generate: Generate greedy captions in validation/test and score them with chrF.
        eval_max_new_tokens: Generation length in evaluation.
        predict_languages: ``predict`` captions every image in each of these languages (default: the row's).
        predict_max_new_tokens: Generation length in ``predict``.
        export_dir: Write the export here when ``fit`` ends (shorthand for the
            :class:`~mmalign.training.callbacks.ExportOnFitEnd` callback with ``output=export_dir``).
        optimizer: Optimizer factory over the trainable parameters (projector, LoRA).
        scheduler: Optional LR scheduler factory (stepped every optimizer step).
    """

    def __init__(
        self,
        image_encoder: Encoder,
        lm: FrozenLM,
        projector: ProjectorFactory,
        prompt: str = "Caption in {language}:",
        prompts: dict[str, str] | None = None,
        image_field: str = "image",
        caption_field: str = "text",
        max_caption_tokens: int = 48,
        eval_generate: bool = True,
        eval_max_new_tokens: int = 24,
        predict_languages: list[str] | None = None,
        predict_max_new_tokens: int = 32,
        export_dir: str | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["image_encoder", "lm", "projector", "optimizer", "scheduler"])
        self._build(image_encoder, lm, projector, prompt=prompt, prompts=prompts, input_field=image_field,
                    target_field=caption_field, max_target_tokens=max_caption_tokens, eval_generate=eval_generate,
                    eval_max_new_tokens=eval_max_new_tokens, predict_languages=predict_languages,
                    predict_max_new_tokens=predict_max_new_tokens, export_dir=export_dir)

    #: Constructor argument and attribute of the frozen encoder (an export records the encoder under this name).
    encoder_arg = "image_encoder"
    #: Batch key of the encoder's raw inputs (``batch["inputs"]``) and cached features (``batch["features"]``).
    input_key = "image"
    #: What :meth:`generate` calls its items in messages.
    item_noun = "images"
    #: Key of the generated text in ``predict`` rows.
    output_key = "caption"

    def _build(self, encoder: Encoder, lm: FrozenLM, projector: ProjectorFactory, *, prompt: str,
               prompts: dict[str, str] | None, input_field: str, target_field: str, max_target_tokens: int,
               eval_generate: bool, eval_max_new_tokens: int, predict_languages: list[str] | None,
               predict_max_new_tokens: int, export_dir: str | None) -> None:
        """Set up encoder, LM, projector and the text options (shared by every prefix-LM subclass)."""
        setattr(self, self.encoder_arg, encoder)
        self.lm = lm
        projector_in = encoder.output_dim
        if getattr(encoder, "has_tokens", False):
            projector_in = int(getattr(encoder, "token_dim", encoder.output_dim))
        self.projector = projector(projector_in, lm.hidden_size)
        self.prompt, self.prompts = prompt, dict(prompts or {})
        self.input_field, self.target_field = input_field, target_field
        self.max_target_tokens = max_target_tokens
        self.eval_generate, self.eval_max_new_tokens = eval_generate, eval_max_new_tokens
        self.predict_languages, self.predict_max_new_tokens = predict_languages, predict_max_new_tokens
        self.export_dir = export_dir
        self._eval_store: dict[str, dict[str, Any]] = {}

    @property
    def encoder(self) -> Encoder:
        """The frozen encoder (``image_encoder``, ``speech_encoder``...)."""
        return getattr(self, self.encoder_arg)

    # Names of the image recipe (kept: CaptionDataModule and users read them).
    @property
    def image_field(self) -> str:
        return self.input_field

    @property
    def caption_field(self) -> str:
        return self.target_field

    @property
    def max_caption_tokens(self) -> int:
        return self.max_target_tokens

    # -- text -------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    def prompt_text(self, lang: str) -> str:
        """The prompt for captions in ``lang``."""
        return self.prompts.get(lang, self.prompt).format(language=language_name(lang), lang=lang)

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        # Seq2seq encoders read "prompt </s>" as in their pretraining; decoder-only LMs read the bare prompt.
        enc = self.tokenizer(list(prompts), add_special_tokens=self.lm.is_seq2seq)
        return [list(ids) for ids in enc["input_ids"]]

    def caption_ids(self, captions: Sequence[str]) -> list[list[int]]:
        # Decoder-only: the caption continues the prompt after a space (word-initial tokens, as in pretraining).
        texts = [c.strip() if self.lm.is_seq2seq else " " + c.strip() for c in captions]
        enc = self.tokenizer(texts, add_special_tokens=False)
        eos = self.tokenizer.eos_token_id
        return [list(ids)[: self.max_target_tokens] + [eos] for ids in enc["input_ids"]]

    # -- forward ----------------------------------------------------------------------------
    def encoder_features(self, batch: dict[str, Any]) -> EncoderOutput:
        """Encoder output from cached features (``batch["features"][input_key]``) or raw inputs."""
        key = self.input_key
        cached = batch.get("features", {}).get(key)
        if cached is not None:
            return (EncoderOutput(**cached) if isinstance(cached, dict) else cached).float()
        if key not in batch.get("inputs", {}):
            raise KeyError(f"batch has neither inputs[{key!r}] nor features[{key!r}]")
        return self.encoder(batch["inputs"][key])

    def image_features(self, batch: dict[str, Any]) -> EncoderOutput:
        """:meth:`encoder_features` (the image recipe's name for it)."""
        return self.encoder_features(batch)

    def prefix_embeds(self, features: EncoderOutput) -> tuple[Tensor, Tensor]:
        """``(prefix [B, K, H] in the LM's dtype, prefix_mask [B, K] bool)``."""
        prefix = self.projector(features)
        if prefix.dim() == 2:  # a pooled projector gives a one-token prefix
            prefix = prefix.unsqueeze(1)
        B, K, _ = prefix.shape
        if getattr(self.projector, "per_token", False) and features.mask is not None:
            mask = features.mask.bool().to(prefix.device)
            if hasattr(self.projector, "output_mask"):  # a projector that downsamples tokens maps the mask too
                mask = self.projector.output_mask(mask)
        else:
            mask = torch.ones(B, K, dtype=torch.bool, device=prefix.device)
        return prefix.to(self.lm.dtype), mask

    def lm_inputs(self, features: EncoderOutput, langs: Sequence[str], captions: Sequence[str] | None,
                  prompts: Sequence[str] | None = None) -> LMInputs:
        prefix, mask = self.prefix_embeds(features)
        prompts = list(prompts) if prompts is not None else [self.prompt_text(lang) for lang in langs]
        return build_lm_inputs(
            self.lm.embed, self.tokenizer.pad_token_id, prefix, mask, self.prompt_ids(prompts),
            None if captions is None else self.caption_ids(captions), seq2seq=self.lm.is_seq2seq,
        )

    def caption_loss(self, batch: dict[str, Any], features: EncoderOutput | None = None) -> CaptionLoss:
        """Next-token cross-entropy over the caption tokens of each row."""
        features = self.encoder_features(batch) if features is None else features
        inputs = self.lm_inputs(features, batch["meta"]["lang"], batch["keys"][self.target_field])
        if self.lm.is_seq2seq:
            decoder_ids = self.lm.model.prepare_decoder_input_ids_from_labels(labels=inputs.labels)
            out = self.lm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, decoder_input_ids=decoder_ids)
            return caption_token_losses(out.logits, inputs.labels, shift=False)
        out = self.lm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask)
        return caption_token_losses(out.logits, inputs.labels, shift=True)

    forward = caption_loss

    # -- generation -------------------------------------------------------------------------
    @torch.no_grad()
    def generate_from_features(self, features: EncoderOutput, langs: Sequence[str], prompts: Sequence[str] | None = None,
                               max_new_tokens: int = 32, **generate_kwargs: Any) -> list[str]:
        """Captions for encoder outputs; ``langs`` and ``prompts`` give one entry per image."""
        inputs = self.lm_inputs(features, langs, None, prompts)
        tok = self.tokenizer
        generate_kwargs = {"do_sample": False, "num_beams": 1, **generate_kwargs}
        out = self.lm.model.generate(
            inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **generate_kwargs,
        )
        # Decoder-only generate with inputs_embeds returns only the new tokens.
        return [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def generate(self, images: Sequence[Any], lang: str | Sequence[str] = "en", prompt: str | None = None,
                 max_new_tokens: int = 32, **generate_kwargs: Any) -> list[str]:
        """Caption raw images (paths, PIL images, uint8 arrays); greedy unless ``generate_kwargs`` say otherwise.

        Args:
            images: Raw images, preprocessed by the image encoder.
            lang: Caption language, one for all or one per image.
            prompt: Prompt text overriding the language template.
            max_new_tokens: Longest caption in tokens.
            generate_kwargs: Passed to transformers ``generate`` (``num_beams``, ``do_sample``...).
        """
        return self._generate_raw(images, lang, prompt, max_new_tokens, **generate_kwargs)

    def _generate_raw(self, items: Sequence[Any], lang: str | Sequence[str], prompt: str | None, max_new_tokens: int,
                      preprocess_kwargs: dict[str, Any] | None = None, **generate_kwargs: Any) -> list[str]:
        """Preprocess raw ``items`` with the encoder, encode them and generate (one text per item)."""
        items = list(items)
        langs = [lang] * len(items) if isinstance(lang, str) else list(lang)
        if len(langs) != len(items):
            raise ValueError(f"got {len(items)} {self.item_noun} but {len(langs)} languages")
        prompts = None if prompt is None else [prompt] * len(items)
        inputs = {k: v.to(self.device) for k, v in self.encoder.preprocess(items, **(preprocess_kwargs or {})).items()}
        features = self.encoder(inputs)
        return self.generate_from_features(features, langs, prompts, max_new_tokens, **generate_kwargs)

    # -- Lightning hooks ---------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.caption_loss(batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["meta"]["id"]))
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        features = self.encoder_features(batch)
        out = self.caption_loss(batch, features)
        langs, refs = batch["meta"]["lang"], batch["keys"][self.target_field]
        self.log(f"{stage}/loss", out.loss, batch_size=len(langs), sync_dist=True, prog_bar=True)
        hyps = self.generate_from_features(features, langs, max_new_tokens=self.eval_max_new_tokens) if self.eval_generate else None
        for i, lang in enumerate(langs):
            s = self._eval_store.setdefault(lang, {"loss_sum": 0.0, "count": 0, "hyps": [], "refs": []})
            s["loss_sum"] += float(out.loss_sum[i])
            s["count"] += int(out.count[i])
            if hyps is not None:
                s["hyps"].append(hyps[i])
                s["refs"].append(refs[i])

    def _eval_epoch_end(self, stage: str) -> None:
        store, self._eval_store = self._eval_store, {}
        if self.trainer.sanity_checking or not store:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, store)
            store = merge_eval_stores(gathered)
        metrics = self.eval_metrics(store, stage)
        self.last_eval = {"stage": stage, "metrics": metrics, "samples": store}
        self.log_dict(metrics, sync_dist=False)

    def eval_metrics(self, store: dict[str, dict[str, Any]], stage: str) -> dict[str, float]:
        """Metrics of one evaluation epoch from the per-language store (loss, ppl, chrF)."""
        return caption_metrics(store, stage)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        features = self.encoder_features(batch)
        meta, n = batch["meta"], len(batch["meta"]["id"])
        refs = batch.get("keys", {}).get(self.target_field, [None] * n)
        rows = []
        for lang_set in ([[lang] * n for lang in self.predict_languages] if self.predict_languages else [meta["lang"]]):
            caps = self.generate_from_features(features, lang_set, max_new_tokens=self.predict_max_new_tokens)
            for i in range(n):
                same_lang = lang_set[i] == meta["lang"][i]
                rows.append({"id": meta["id"][i], "lang": lang_set[i], self.output_key: caps[i],
                             "reference": refs[i] if same_lang else None, "prompt": self.prompt_text(lang_set[i])})
        return rows

    def on_fit_end(self) -> None:
        if self.export_dir:
            from mmalign.training.callbacks import ExportOnFitEnd

            ExportOnFitEnd(output=self.export_dir).on_fit_end(self.trainer, self)

    # -- weights -----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        """Load trainable weights; frozen encoder/LM weights are never expected in a checkpoint."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            missing = sorted(set(self.state_dict()) - set(state_dict))
            if missing or result.unexpected_keys:
                raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
        return result


    # -- export ------------------------------------------------------------------------------
    def export_config(self) -> dict[str, Any]:
        """The ``config.json`` :meth:`save_pretrained` writes (without its ``weights`` entry)."""
        from mmalign.export.captioner import captioner_config

        return captioner_config(self)

    def save_pretrained(self, directory: str | Path, **provenance: Any) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (projector and LoRA weights only), atomically.

        The format is the one of every mmalign export (:mod:`mmalign.export.captioner`); ``provenance``
        takes ``languages``, ``recipe``, ``metrics``, ``checkpoint``, ``epoch``, ``global_step``.
        """
        from mmalign.export.writer import export_module

        return export_module(self, directory, **provenance)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu", strict: bool = True,
                        trusted_classes: Sequence[str | type] | None = None,
                        encoder_overrides: dict[str, Any] | None = None,
                        lm_overrides: dict[str, Any] | None = None) -> "PrefixCaptioningModule":
        """Rebuild encoder, projector and LM from an export and load its weights (strictly).

        The export is untrusted: only the project's own encoder/projector/LM classes are imported (plus
        ``trusted_classes``), sizes are checked against the weights header first, the sha256 must match.

        Args:
            directory: The export.
            map_location: Device of the rebuilt module.
            strict: Refuse an image encoder whose ``cache_key`` differs from the recorded one (else warn).
            trusted_classes: Classes from outside mmalign's packages to accept (still of the right base class).
            encoder_overrides: ``{init_arg: value}`` replacing the recorded encoder arguments, e.g. a local copy of
                the same checkpoint (``{"model_name": "/models/whisper-base"}``): a shared export never names a
                local path itself (refused), so the user passes the one they trust.
            lm_overrides: The same for the frozen LM (``{"model_name": "/models/mt5-small"}``).

        Raises:
            ExportError: The directory is not a captioner export, or it is unsafe or inconsistent.
        """
        from mmalign.export.captioner import load_captioner

        return load_captioner(cls, directory, map_location=map_location, strict=strict, trusted_classes=trusted_classes,
                              encoder_overrides=encoder_overrides, lm_overrides=lm_overrides)
