"""The sequences a prefix LM reads: prefix + prompt (+ target) embeddings, masks, labels, and the loss over targets.

Plain functions over tensors (no model): :func:`build_lm_inputs` lays out decoder-only and seq2seq inputs,
:func:`caption_token_losses` scores the target tokens only (``-100`` elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


@dataclass
class LMInputs:
    """What the frozen LM receives.

    Attributes:
        inputs_embeds: ``[B, L, H]`` (causal: whole sequence; seq2seq: encoder input).
        attention_mask: ``[B, L]`` long, 1 on real positions.
        labels: Causal: ``[B, L]`` aligned with ``inputs_embeds`` (``-100`` on prefix, prompt and padding);
            seq2seq: ``[B, C]`` decoder targets; ``None`` when building generation inputs.
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    labels: Tensor | None = None


@dataclass
class CaptionLoss:
    """Per-sample caption cross-entropy: ``loss_sum [B]`` (nats, summed over caption tokens), ``count [B]``."""

    loss_sum: Tensor
    count: Tensor

    @property
    def loss(self) -> Tensor:
        """Mean over every caption token of the batch."""
        return self.loss_sum.sum() / self.count.sum().clamp_min(1)


def build_lm_inputs(
    embed: Callable[[Tensor], Tensor],
    pad_id: int,
    prefix: Tensor,
    prefix_mask: Tensor,
    prompt_ids: Sequence[Sequence[int]],
    caption_ids: Sequence[Sequence[int]] | None,
    seq2seq: bool,
) -> LMInputs:
    """Concatenate prefix, prompt (and caption) embeddings and build masks and labels.

    Training sequences are right-padded; causal generation inputs (``caption_ids=None``) are left-padded so
    every row ends at its last prompt token. Positions that the LM derives from the attention mask are the
    same in both layouts. A prefix with masked positions (speech frames of a padded batch) is packed: each
    row's real prefix tokens, prompt and caption become contiguous, so padding lies only at one end of the
    row (never between the prefix and the prompt) and columns that are padding in every row are dropped.

    Args:
        embed: The LM's token embedding (``ids [B, T] -> [B, T, H]``).
        pad_id: Padding token id.
        prefix: ``[B, K, H]`` visual prefix.
        prefix_mask: ``[B, K]`` bool, True on real prefix tokens.
        prompt_ids: Token ids of each row's prompt.
        caption_ids: Token ids of each row's caption (ending with eos), or ``None`` for generation.
        seq2seq: Build encoder inputs + decoder labels instead of one decoder-only sequence.
    """
    B, K, _ = prefix.shape
    device = prefix.device
    joint = caption_ids is not None and not seq2seq
    texts = [list(p) + list(c) for p, c in zip(prompt_ids, caption_ids)] if joint else [list(p) for p in prompt_ids]
    T = max(len(t) for t in texts)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    text_labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        if joint:
            start = len(prompt_ids[i])
            text_labels[i, start : len(t)] = torch.tensor(caption_ids[i], dtype=torch.long)
    ids, text_labels = ids.to(device), text_labels.to(device)
    text_mask = torch.arange(T, device=device)[None] < torch.tensor([len(t) for t in texts], device=device)[:, None]
    embeds = torch.cat([prefix, embed(ids).to(prefix.dtype)], dim=1)  # [B, K+T, H]
    mask = torch.cat([prefix_mask.bool(), text_mask], dim=1).long()  # [B, K+T]
    labels = None
    if joint:
        labels = torch.cat([torch.full((B, K), IGNORE, dtype=torch.long, device=device), text_labels], dim=1)
    if not bool(prefix_mask.all()):
        embeds, mask, labels = _pack(embeds, mask, labels)
    if joint:
        return LMInputs(embeds, mask, labels)
    if seq2seq:
        labels = None
        if caption_ids is not None:
            C = max(len(c) for c in caption_ids)
            labels = torch.full((B, C), IGNORE, dtype=torch.long)
            for i, c in enumerate(caption_ids):
                labels[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            labels = labels.to(device)
        return LMInputs(embeds, mask, labels)
    # Causal generation: roll each row right by its padding so the padding comes first.
    L = embeds.shape[1]
    shift = (L - mask.sum(1))[:, None]  # [B, 1]
    index = (torch.arange(L, device=device)[None] - shift) % L  # [B, L]
    embeds = embeds.gather(1, index[..., None].expand_as(embeds))
    return LMInputs(embeds, mask.gather(1, index))


def _pack(embeds: Tensor, mask: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Move each row's real positions to its front (order kept) and drop all-padding columns."""
    order = torch.sort((~mask.bool()).to(torch.int8), dim=1, stable=True).indices  # real first, in order
    length = int(mask.sum(1).max())
    order = order[:, :length]
    embeds = embeds.gather(1, order[..., None].expand(-1, -1, embeds.shape[-1]))
    return embeds, mask.gather(1, order), None if labels is None else labels.gather(1, order)


def caption_token_losses(logits: Tensor, labels: Tensor, shift: bool) -> CaptionLoss:
    """Cross-entropy summed per row over positions whose label is not ``-100``.

    Args:
        logits: ``[B, L, V]``.
        labels: ``[B, L]``.
        shift: Causal LM: logits at position ``t`` predict the label at ``t + 1``.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")  # [B, L]
    valid = labels.ne(IGNORE)
    return CaptionLoss(loss_sum=(ce * valid).sum(1), count=valid.sum(1))
