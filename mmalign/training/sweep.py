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

``mmalign fit --config RECIPE --sweep_seeds [0,1,2,3]`` trains a recipe's model under each seed as one
:class:`SweepModule` (Lightning stays the engine: its checkpoints hold every member and the AdamW state, so
``--ckpt_path`` resumes a sweep). Each member is the recipe's model exactly as ``mmalign fit`` builds it
under ``seed_everything(seed)``; all members see the same batches (the data order of the recipe's own
``seed_everything``), so member ``i`` equals a lone fit with that initialisation and that data order
(``tests/test_sweep.py``). At the end of the fit, ``<run>/sweep/seed-<s>/`` holds each member's export and
``<run>/sweep/ensemble.json`` lists them; :class:`Ensemble` embeds with the mean of the members' L2-normalised
embeddings. Constant learning rates only (a recipe scheduler is refused), no dropout in the projectors.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

__all__ = ["Ensemble", "ModuleMember", "PairMember", "Sweep", "SweepModule", "build_members"]


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


class ModuleMember(nn.Module):
    """An :class:`~mmalign.training.module.AlignmentModule` as a sweep member: ``forward(batch) -> loss``
    (the sum of its objectives' losses on a cached batch, as its ``training_step`` computes it)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any) -> Tensor:
        m = self.module
        losses = m.compute_losses(m(batch), m.batch_groups(batch))
        return torch.stack(list(losses.values())).sum()


def _adamw_settings(module: Any) -> tuple[float, float, tuple[float, float], float]:
    """``(lr, weight_decay, betas, eps)`` of the recipe's optimizer (AdamW or Adam, no scheduler)."""
    if getattr(module, "scheduler", None) is not None or getattr(module, "_scheduler", None) is not None:
        raise ValueError("--sweep_seeds trains with constant learning rates: remove the recipe's scheduler")
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    if isinstance(opt, (list, tuple)):
        opt = opt[0]
    if not isinstance(opt, (torch.optim.AdamW, torch.optim.Adam)):
        raise ValueError(f"--sweep_seeds needs an AdamW recipe optimizer, got {type(opt).__name__}")
    g = opt.param_groups[0]
    wd = g["weight_decay"] if isinstance(opt, torch.optim.AdamW) else 0.0
    return float(g["lr"]), float(wd), tuple(g["betas"]), float(g["eps"])


def _lightning():
    import lightning as L

    return L


class SweepModule(_lightning().LightningModule):
    """N members of one recipe trained as one batched model under Lightning (manual optimisation).

    The stacked parameters and AdamW moments are buffers of this module, so Lightning checkpoints hold
    all of them and ``--ckpt_path`` resumes the sweep exactly.

    Args:
        members: The recipe's model built once per seed (:meth:`from_cli` builds them as ``mmalign fit`` does).
        seeds: The seed of each member (named in the exports).
    """

    def __init__(self, members: Sequence[nn.Module], seeds: Sequence[int]) -> None:
        super().__init__()
        for name, sub in members[0].named_modules():  # the trained parts (frozen encoders run in eval mode)
            if "projector" not in name.split(".") and not name.startswith("objectives"):
                continue
            if isinstance(sub, nn.Dropout) and sub.p > 0 or isinstance(sub, nn.modules.batchnorm._BatchNorm):
                raise ValueError(f"--sweep_seeds: {name} ({type(sub).__name__}) draws randomness or updates shared running "
                                 "statistics, which batched members cannot; set the projectors' dropout: 0.0 and a norm "
                                 "other than batch")
        self.automatic_optimization = False
        self.seeds = [int(s) for s in seeds]
        self.template = members[0]  # towers, objectives, hooks of the recipe (its trainable tensors are replaced)
        lr, wd, betas, eps = _adamw_settings(members[0])
        self.sweep = Sweep([ModuleMember(m) for m in members], lr=lr, weight_decay=wd, betas=betas, eps=eps)
        self._names = list(self.sweep.params)
        for i, k in enumerate(self._names):  # checkpointed with the module
            self.register_buffer(f"sweep_param_{i}", self.sweep.params[k])
            self.register_buffer(f"sweep_avg_{i}", self.sweep.exp_avg[k])
            self.register_buffer(f"sweep_avg_sq_{i}", self.sweep.exp_avg_sq[k])
        self.register_buffer("sweep_steps", torch.zeros((), dtype=torch.long))

    @property
    def towers(self) -> Any:  # what the DataModule connects to (fields, encoders' preprocessing)
        return self.template.towers

    @property
    def objectives(self) -> Any:
        return self.template.objectives

    @classmethod
    def from_cli(cls, parser: Any, config: Any, seeds: Sequence[int]) -> "SweepModule":
        """Instantiate the recipe's model once per seed exactly as LightningCLI does (seed, then classes)."""
        import random

        import numpy as np

        L = _lightning()
        state = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
        members = []
        for seed in seeds:
            L.seed_everything(int(seed), verbose=False)
            members.append(parser.instantiate_classes(config).model)
        # the data order stays the one a lone fit of the recipe's own seed_everything draws
        torch.random.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])
        return cls(members, seeds)

    def _bind(self) -> None:
        """Point the engine at the buffers (after ``.to(device)`` or a checkpoint load replaced them)."""
        for i, k in enumerate(self._names):
            self.sweep.params[k] = getattr(self, f"sweep_param_{i}")
            self.sweep.exp_avg[k] = getattr(self, f"sweep_avg_{i}")
            self.sweep.exp_avg_sq[k] = getattr(self, f"sweep_avg_sq_{i}")
        like = self.sweep.params[self._names[0]]
        self.sweep.lr, self.sweep.weight_decay = self.sweep.lr.to(like.device), self.sweep.weight_decay.to(like.device)
        self.sweep.steps = int(self.sweep_steps)

    def configure_optimizers(self) -> Any:
        return None  # the sweep's own vectorised AdamW

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return self.template.transfer_batch_to_device(batch, device, dataloader_idx)

    def on_train_start(self) -> None:
        self._bind()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._bind()
        losses = self.sweep.step(batch)  # [N]
        self.sweep_steps.fill_(self.sweep.steps)
        if self.trainer is not None and (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0:
            self.log("train/loss", losses.mean(), prog_bar=True)
        self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_completed()  # global_step

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._bind()
        losses = self.sweep.losses(batch)
        self.log("val/loss", losses.mean(), batch_size=len(batch["meta"]["id"]))

    def member(self, i: int) -> nn.Module:
        """Member ``i`` as a standalone recipe model with its trained parameters."""
        self._bind()
        return self.sweep.member(i).module

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            self.export_members(Path(self.trainer.default_root_dir if self.trainer.log_dir is None else self.trainer.log_dir) / "sweep")

    def export_members(self, folder: str | Path) -> Path:
        """Write ``folder/seed-<s>/`` (each member's export) and ``folder/ensemble.json`` (the list)."""
        import json

        from mmalign.export.writer import export_module

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for i, seed in enumerate(self.seeds):
            export_module(self.member(i).cpu(), folder / f"seed-{seed}", global_step=int(self.sweep_steps))
            names.append(f"seed-{seed}")
        (folder / "ensemble.json").write_text(json.dumps({"members": names, "combine": "mean of L2-normalised embeddings"}, indent=1) + "\n")
        return folder


class Ensemble:
    """The members of a sweep (``<run>/sweep``) as one embedder: the mean of their L2-normalised embeddings.

    Each member is loaded with the safe export loader (:class:`~mmalign.export.model.AlignedModel`); member
    names must be folders inside ``folder`` (nothing outside it is read).
    """

    def __init__(self, folder: str | Path) -> None:
        import json

        from mmalign.export.model import AlignedModel

        folder = Path(folder).resolve()
        spec = json.loads((folder / "ensemble.json").read_text())
        self.members = []
        for name in spec["members"]:
            path = (folder / str(name)).resolve()
            if path.parent != folder:
                raise ValueError(f"{folder / 'ensemble.json'}: member {name!r} is not a folder inside {folder}")
            self.members.append(AlignedModel.from_pretrained(str(path)))

    def embed(self, items: Sequence[Any], **kwargs: Any) -> Tensor:
        outs = [torch.nn.functional.normalize(m.embed(items, **kwargs).float(), dim=-1) for m in self.members]
        return torch.nn.functional.normalize(torch.stack(outs).mean(0), dim=-1)
