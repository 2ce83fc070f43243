"""GradCache: contrastive steps on batches larger than the projector graph fits (Gao et al., 2021).

"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (Gao, Zhang, Han, Callan,
RepL4NLP 2021). A contrastive loss couples every row of the batch to every other, so the batch cannot be
split into independent micro-batches. GradCache splits the *graph* instead:

1. project every chunk without a graph and concatenate the embeddings ``[B, D]``;
2. compute the full-batch loss on detached leaf copies and take ``dL/d embeds`` (the cache);
3. re-project chunk by chunk with a graph and backpropagate ``sum(embeds_chunk * cache_chunk)``,
   whose gradient w.r.t. the projector parameters is exactly that chunk's share of ``dL/d theta``.

The summed gradient equals the full-batch gradient (up to float rounding). Encoders are frozen here, so
their features are computed once per chunk and reused by both passes; only projectors run twice. Random
state (dropout) is captured before each chunk's first pass and restored for its second, so both passes
see the same masks. Projectors must treat rows independently: BatchNorm in training mode normalises
with the statistics of whatever rows it sees and therefore breaks the equality (rejected by
:func:`check_per_sample`).

Library code: torch only. The Lightning side (manual optimization, DDP ``no_sync``) lives in
:class:`mmalign.training.module.AlignmentModule` (``grad_cache_chunk``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor, nn


def chunk_ranges(batch_size: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(batch_size)`` in chunks of ``chunk_size`` rows."""
    if chunk_size < 1:
        raise ValueError(f"grad-cache chunk size must be a positive number of rows, got {chunk_size}")
    return [(s, min(s + chunk_size, batch_size)) for s in range(0, batch_size, chunk_size)]


def slice_rows(inputs: dict[str, Any], start: int, stop: int, batch_size: int) -> dict[str, Any]:
    """Rows ``start:stop`` of a preprocessed batch: tensors and lists of length ``batch_size`` are sliced."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            out[key] = value[start:stop]
        elif isinstance(value, (list, tuple)) and len(value) == batch_size:
            out[key] = value[start:stop]
        else:  # per-batch constants (sampling rate, ...) are shared by every chunk
            out[key] = value
    return out


def check_per_sample(modules: dict[str, nn.Module]) -> None:
    """Raise if a trainable module mixes rows of a batch (BatchNorm), which chunking would change.

    Raises:
        ValueError: Naming the first offending module.
    """
    for name, module in modules.items():
        for sub_name, sub in module.named_modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and any(p.requires_grad for p in sub.parameters()):
                raise ValueError(
                    f"grad_cache_chunk needs projectors that treat rows independently, but {name}.{sub_name} is "
                    f"a {type(sub).__name__} (batch statistics depend on the chunk); use norm='layer' or no chunking"
                )


class RandState:
    """Snapshot of the CPU and CUDA random generators, restorable later (dropout masks repeat)."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@dataclass
class GradCacheOutput:
    """Result of :func:`grad_cache_backward`.

    Attributes:
        loss: The full-batch total loss (detached scalar).
        losses: Its named terms (detached), as the loss function returned them.
        embeds: Full-batch embeddings per tower (detached), ``{name: [B, D]}``.
    """

    loss: Tensor
    losses: dict[str, Tensor]
    embeds: dict[str, Tensor]


def grad_cache_backward(
    project: Callable[[int], dict[str, Tensor]],
    num_chunks: int,
    loss_fn: Callable[[dict[str, Tensor]], dict[str, Tensor]],
    backward: Callable[[Tensor], None] = Tensor.backward,
    sync: Callable[[bool], ContextManager] = lambda last: contextlib.nullcontext(),
) -> GradCacheOutput:
    """Accumulate the full-batch gradient of ``loss_fn`` into the parameters, chunk by chunk.

    Args:
        project: ``project(i) -> {tower: embeds [b_i, D]}`` of chunk ``i`` (graph built when grad is
            enabled). Must be deterministic given the random state.
        num_chunks: Number of chunks; their concatenation in order is the batch.
        loss_fn: Full-batch ``{tower: [B, D]} -> {name: scalar loss term}`` (summed into the loss). Its
            own parameters (temperatures) get their gradient from the last chunk's backward.
        backward: How to backpropagate a scalar (``LightningModule.manual_backward`` for precision
            plugins and DDP; plain ``Tensor.backward`` by default).
        sync: ``sync(is_last_chunk)`` context around each chunk's backward; DDP passes ``no_sync`` for
            all chunks but the last so gradients are all-reduced once.

    Returns:
        :class:`GradCacheOutput` with the loss, its terms and the embeddings (all detached).
    """
    states: list[RandState] = []
    chunks: list[dict[str, Tensor]] = []
    with torch.no_grad():  # pass 1: embeddings only, no graph
        for i in range(num_chunks):
            states.append(RandState())
            chunks.append(project(i))
    names = list(chunks[0])
    sizes = [len(next(iter(c.values()))) for c in chunks]
    leaves = {k: torch.cat([c[k] for c in chunks]).detach().requires_grad_(True) for k in names}  # [B, D]
    losses = loss_fn(leaves)
    loss = torch.stack([v for v in losses.values()]).sum()
    cache = torch.autograd.grad(loss, list(leaves.values()), retain_graph=True, allow_unused=True)
    grads = {k: (torch.zeros_like(leaves[k]) if g is None else g).split(sizes) for k, g in zip(names, cache)}
    after = RandState()
    for i in range(num_chunks):  # pass 2: re-project with a graph and backprop the cached gradients
        last = i == num_chunks - 1
        states[i].restore()
        embeds = project(i)
        terms = [(embeds[k] * grads[k][i].to(embeds[k].dtype)).sum() for k in names if embeds[k].requires_grad]
        if last:  # the loss's own parameters (logit scale/bias) get their gradient here, once
            terms.append(loss)
        if not terms:
            continue
        with sync(last):
            backward(torch.stack([t.float() for t in terms]).sum())
    after.restore()
    return GradCacheOutput(
        loss=loss.detach(), losses={k: v.detach() for k, v in losses.items()}, embeds={k: v.detach() for k, v in leaves.items()}
    )
