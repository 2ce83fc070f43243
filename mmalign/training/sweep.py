"""Many runs at once: N seeds / learning rates of one recipe trained as one batched model (issue 21.4).

Projector training on cached features is small dense math; N runs of it one after another leave a
GPU mostly idle and read the cache N times. :class:`Sweep` holds N *members* (the same module class,
each built under its own seed) as one set of stacked parameters (``torch.func.stack_module_state``:
every trainable tensor gets a leading ``[N]`` dim) and evaluates all members on the same batch with
``torch.func.vmap`` over ``torch.func.functional_call``: one pass over the data, one (batched) kernel
per layer instead of N. Frozen parameters and buffers (e.g. encoders) are shared, not stacked.

The update is a vectorised AdamW (the formula of ``torch.optim.AdamW``, ``foreach``/non-fused) with a
learning rate and weight decay *per member*, so a sweep of learning rates is one model too. Each
member's trajectory equals the run of its twin trained alone with ``torch.optim.AdamW`` on the same
batches (``tests/test_sweep.py``: to float32 rounding). Members must not use dropout or other
randomness in their forward (``vmap`` would draw it differently from the sequential run).

A member is any ``nn.Module`` whose ``forward(*inputs)`` returns the scalar loss of one batch, e.g.
:class:`PairMember` (two projectors and a contrastive loss over cached pooled features).

Left for later (not here): ``mmalign fit --sweep`` in the CLI, per-member checkpoints/exports and the
ensemble export; this module is the engine they would call.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

__all__ = ["PairMember", "Sweep", "build_members"]


class PairMember(nn.Module):
    """Two projectors over cached pooled features and a contrastive loss: ``forward(a, b) -> loss``.

    Args:
        a_proj: Projector of side a (e.g. ``projectors.MLP``).
        b_proj: Projector of side b.
        loss: A loss module returning ``{"..._loss": scalar}`` (``ClipLoss``, ``SigLipLoss``...).
    """

    def __init__(self, a_proj: nn.Module, b_proj: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.a_proj, self.b_proj, self.loss = a_proj, b_proj, loss

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        from encoders.base import EncoderOutput  # projectors read EncoderOutput (pooled [B, D])

        out = self.loss(self.a_proj(EncoderOutput(a.float())), self.b_proj(EncoderOutput(b.float())))
        return sum(out.values())


def build_members(factory: Callable[[], nn.Module], seeds: Sequence[int]) -> list[nn.Module]:
    """``factory()`` once per seed under ``torch.manual_seed(seed)`` (the initialisation a lone run with that seed gets)."""
    members = []
    for seed in seeds:
        torch.manual_seed(seed)
        members.append(factory())
    return members


def _per_member(value: float | Sequence[float], n: int, name: str, like: Tensor) -> Tensor:
    if isinstance(value, (int, float)):
        value = [float(value)] * n
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} values for {n} members")
    return torch.tensor([float(v) for v in value], dtype=like.dtype, device=like.device)


class Sweep:
    """N members trained as one batched model with per-member AdamW hyperparameters.

    Args:
        members: N modules of one class and shape (e.g. from :func:`build_members`).
        lr: Learning rate, one for all or one per member.
        weight_decay: AdamW weight decay, one or per member.
        betas: AdamW betas (shared).
        eps: AdamW epsilon (shared).
    """

    def __init__(self, members: Sequence[nn.Module], lr: float | Sequence[float] = 1e-3,
                 weight_decay: float | Sequence[float] = 1e-2, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        if not members:
            raise ValueError("a sweep needs at least one member")
        self.n = len(members)
        names = [n for n, p in members[0].named_parameters() if p.requires_grad]
        for m in members[1:]:
            if [n for n, p in m.named_parameters() if p.requires_grad] != names:
                raise ValueError("sweep members must have the same trainable parameters (one recipe, other seeds)")
        # The template computes; stacked trainable tensors replace its parameters in functional_call.
        self.base = members[0]
        trainable = [nn.ParameterDict({n.replace(".", "/"): p for n, p in m.named_parameters() if p.requires_grad}) for m in members]
        stacked, _ = stack_module_state(trainable)
        self.params: dict[str, Tensor] = {k.replace("/", "."): v.detach().clone() for k, v in stacked.items()}
        like = next(iter(self.params.values()))
        self.lr = _per_member(lr, self.n, "lr", like)
        self.weight_decay = _per_member(weight_decay, self.n, "weight_decay", like)
        self.betas, self.eps = betas, eps
        self.exp_avg = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.steps = 0

    def _shape(self, x: Tensor, ref: Tensor) -> Tensor:
        return x.view(-1, *([1] * (ref.dim() - 1)))

    def losses(self, *inputs: Tensor) -> Tensor:
        """``[N]`` losses of every member on the same batch (no update)."""
        with torch.no_grad():
            return vmap(lambda p: functional_call(self.base, p, inputs), randomness="error")(self.params)

    def step(self, *inputs: Tensor) -> Tensor:
        """One AdamW step of every member on the same batch; returns the ``[N]`` losses before it."""
        grads, losses = vmap(grad_and_value(lambda p: functional_call(self.base, p, inputs)), randomness="error")(self.params)
        self.steps += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
        with torch.no_grad():
            for k, p in self.params.items():
                g = grads[k]
                lr, wd = self._shape(self.lr, p), self._shape(self.weight_decay, p)
                p.mul_(1 - lr * wd)
                self.exp_avg[k].lerp_(g, 1 - b1)
                self.exp_avg_sq[k].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = self.exp_avg_sq[k].sqrt().div_(c2 ** 0.5).add_(self.eps)
                p.sub_(denom.reciprocal_().mul_(self.exp_avg[k]).mul_(lr / c1))  # in place: no [N, ...] temporaries
        return losses.detach()

    def member_state(self, i: int) -> dict[str, Tensor]:
        """Trainable tensors of member ``i`` (load into a member with ``load_state_dict(strict=False)``)."""
        return {k: v[i].detach().clone() for k, v in self.params.items()}

    def member(self, i: int) -> nn.Module:
        """A standalone copy of member ``i`` with its trained parameters (for export / evaluation)."""
        m = copy.deepcopy(self.base)
        m.load_state_dict(self.member_state(i), strict=False)
        return m

    def ensemble(self, fn: Callable[[nn.Module], Any]) -> list[Any]:
        """``fn(member)`` for every member (e.g. their embeddings, to average for an ensemble)."""
        return [fn(self.member(i)) for i in range(self.n)]
