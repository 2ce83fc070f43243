"""Many runs at once: N seeds / hyperparameter settings of one recipe trained as one batched model (issue 21.4).

One module of ~630 lines on purpose: the stacked member state (parameters, BatchNorm buffers, AdamW moments), the
vectorised update, the Lightning wrapper that checkpoints that state and the :class:`Ensemble` that reads it back
are one format; split, its keys would be defined in one file and parsed in another.

Projector training on cached features is small dense math; N runs of it one after another leave a
GPU mostly idle and read the cache N times. :class:`Sweep` holds N *members* (the same module class,
each built under its own seed) as one set of stacked parameters (``torch.func.stack_module_state``:
every trainable tensor gets a leading ``[N]`` dim) and evaluates all members on the same batch with
``torch.func.vmap`` over ``torch.func.functional_call``: one pass over the data, one (batched) kernel
per layer instead of N. Frozen parameters and buffers (e.g. encoders) are shared, not stacked; the
running statistics of BatchNorm layers are stacked (``[N, C]``) and each member updates its own.

The update is a vectorised AdamW (the formula of ``torch.optim.AdamW``, ``foreach``/non-fused) with a
learning rate and weight decay *per member*, so a sweep of learning rates is one model too. Without
dropout, each member's trajectory equals the run of its twin trained alone with ``torch.optim.AdamW`` on
the same batches (``tests/test_sweep.py``: to float32 rounding). With dropout the members draw their masks
under ``vmap(randomness="different")``: every member its own mask from one stream seeded by the recipe's
seed, so a member is a valid run of its recipe but its masks are not the ones a lone fit would draw (that
fit draws ``[B, H]`` from the global generator between other draws; the sweep draws ``[N, B, H]`` at once),
and its trajectory differs from the lone fit's the way a re-run under another dropout seed does.

A member is any ``nn.Module`` whose ``forward(*inputs)`` returns the scalar loss of one batch, e.g.
:class:`PairMember` (two projectors and a contrastive loss over cached pooled features).

``mmalign fit --config RECIPE --sweep_seeds [0,1,2,3]`` trains a recipe's model under each seed as one
:class:`SweepModule`; ``--sweep '{lr: [1e-3, 3e-4], weight_decay: [0.0, 0.01]}'`` adds hyperparameter members
(the grid of the lists, under each seed of ``--sweep_seeds``, default the recipe's ``seed_everything``).
Lightning stays the engine: its checkpoints hold every member, the AdamW state and the recipe's LR scheduler
(stepped per member, on each member's own learning rate), so ``--ckpt_path`` resumes a sweep. Each member is
the recipe's model exactly as ``mmalign fit`` builds it under ``seed_everything(seed)``; all members see the
same batches (the data order of the recipe's own ``seed_everything``), so a dropout-free member equals a lone
fit with that initialisation, those settings and that data order (``tests/test_sweep.py``). Validation logs
each member's retrieval monitor (``val/<member>/R@1``) and their mean as ``val/R@1`` (what the recipe's
``ModelCheckpoint`` keeps the best sweep by). At the end of the fit ``<run>/sweep/<member>/`` holds each
member's export, its final Lightning checkpoint ``model.ckpt`` and the member's recipe ``config.yaml`` (seed
and settings filled in), so ``mmalign eval``/``mmalign export``/``AlignedModel`` load a member like a plain
fit's; ``<run>/sweep/ensemble.json`` lists them; :class:`Ensemble` embeds with the mean of the members'
L2-normalised embeddings.

One module of ~630 lines on purpose: the stacked members, their Lightning module and the per-member outputs
(checkpoints, exports, ensemble) share one member layout; split, each part would re-derive it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from mmalign.training.rng import RngCheckpointHooks

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


def stacked_buffers(members: Sequence[nn.Module]) -> dict[str, Tensor]:
    """``{name: [N, ...]}``: the buffers of BatchNorm layers and centred towers (running statistics each member
    updates) and any
    buffer whose value differs between members; other buffers (frozen encoders') stay shared."""
    norms = {name for name, m in members[0].named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    # a centred tower's running output mean (Tower(center=True)) is per-member state too, like BatchNorm's
    norms |= {name for name, m in members[0].named_modules() if getattr(m, "center", False) is True
              and hasattr(m, "embedding_mean")}
    per = [dict(m.named_buffers()) for m in members]
    out = {}
    for name, buf in per[0].items():
        owner = name.rpartition(".")[0]
        if owner in norms or any(p[name].shape != buf.shape or not torch.equal(p[name], buf) for p in per[1:]):
            out[name] = torch.stack([p[name].detach() for p in per]).clone()
    return out


class Sweep:
    """N members trained as one batched model with per-member AdamW hyperparameters.

    Args:
        members: N modules of one class and shape (e.g. from :func:`build_members`).
        lr: Learning rate, one for all or one per member (:attr:`lr` may be changed between steps: schedules).
        weight_decay: AdamW weight decay, one or per member.
        betas: AdamW betas (shared).
        eps: AdamW epsilon (shared).

    Buffers of BatchNorm layers, and any buffer that differs between members, are stacked (:attr:`buffers`)
    and updated per member in training mode. Dropout (or other randomness) in the members' forward is drawn
    per member (``vmap(randomness="different")``); without it ``randomness="error"`` keeps the exactness check.
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
        self.buffers: dict[str, Tensor] = stacked_buffers(members)
        random = any(isinstance(m, nn.Dropout) and m.p > 0 or isinstance(m, (nn.AlphaDropout, nn.FeatureAlphaDropout))
                     for m in self.base.modules())
        self.randomness = "different" if random else "error"
        norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
        self._has_norm = any(isinstance(m, norms) for m in self.base.modules())
        like = next(iter(self.params.values()))
        self.lr = _per_member(lr, self.n, "lr", like)
        self.weight_decay = _per_member(weight_decay, self.n, "weight_decay", like)
        self.betas, self.eps = betas, eps
        self.exp_avg = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.steps = 0

    def _shape(self, x: Tensor, ref: Tensor) -> Tensor:
        return x.view(-1, *([1] * (ref.dim() - 1)))

    def _precision(self) -> Any:
        """Autocast off around the vmapped members when they hold norm layers: vmap's batch/layer-norm rules need
        one dtype (bf16 activations with fp32 weights fail), so under ``bf16-mixed`` such members compute in fp32."""
        device = next(iter(self.params.values())).device.type
        if self._has_norm and torch.is_autocast_enabled(device):
            return torch.autocast(device, enabled=False)
        return contextlib.nullcontext()

    def losses(self, *inputs: Tensor) -> Tensor:
        """``[N]`` losses of every member on the same batch (no update)."""
        with torch.no_grad(), self._precision():
            return vmap(lambda p, b: functional_call(self.base, (p, b), inputs), randomness=self.randomness)(
                self.params, self.buffers)

    def step(self, *inputs: Tensor) -> Tensor:
        """One AdamW step of every member on the same batch; returns the ``[N]`` losses before it."""
        with self._precision():
            grads, losses = vmap(grad_and_value(lambda p, b: functional_call(self.base, (p, b), inputs)),
                                 randomness=self.randomness)(self.params, self.buffers)
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
        """Trainable tensors and stacked buffers of member ``i`` (load with ``load_state_dict(strict=False)``)."""
        return {k: v[i].detach().clone() for k, v in {**self.params, **self.buffers}.items()}

    def member(self, i: int) -> nn.Module:
        """A standalone copy of member ``i`` with its trained parameters (for export / evaluation)."""
        # factories the modules keep (a CLI's class instantiators reach the whole CLI, its trainer and data
        # iterators) are shared with the copy, not copied
        memo = {id(v): v for mod in self.base.modules() for v in vars(mod).values()
                if callable(v) and not isinstance(v, (nn.Module, Tensor, type))}
        m = copy.deepcopy(self.base, memo)
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
        losses = m.compute_losses(m(batch), m.batch_groups(batch), batch.get("present"))
        return torch.stack(list(losses.values())).sum()


def _adamw_settings(module: Any) -> tuple[float, float, tuple[float, float], float]:
    """``(lr, weight_decay, betas, eps)`` of the recipe's optimizer (AdamW, or Adam without weight decay)."""
    opt = module._optimizer(module.trainable_parameters()) if hasattr(module, "_optimizer") else module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    if isinstance(opt, (list, tuple)):
        opt = opt[0]
    if not isinstance(opt, (torch.optim.AdamW, torch.optim.Adam)):
        raise ValueError(f"a sweep needs an AdamW recipe optimizer, got {type(opt).__name__}")
    g = opt.param_groups[0]
    if g.get("amsgrad") or g.get("maximize"):
        raise ValueError("a sweep runs plain AdamW: set the recipe optimizer's amsgrad and maximize to false")
    if isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW) and g["weight_decay"]:
        raise ValueError("a sweep runs AdamW (decoupled weight decay): use torch.optim.AdamW, not Adam with weight_decay")
    wd = g["weight_decay"] if isinstance(opt, torch.optim.AdamW) else 0.0
    return float(g["lr"]), float(wd), tuple(g["betas"]), float(g["eps"])


SETTINGS = ("lr", "weight_decay")  # what --sweep varies per member (the vectorised AdamW's per-member tensors)


def sweep_members(seeds: Sequence[int], settings: dict[str, Sequence[float]] | None = None) -> list[dict[str, Any]]:
    """The members of a sweep: every seed times the grid of ``settings`` (``{"lr": [...], "weight_decay": [...]}``),
    as ``[{"seed": s, "lr": ..., ...}]`` in that order (seeds outermost). Raises on an unknown or empty setting."""
    settings = dict(settings or {})
    for key, values in settings.items():
        if key not in SETTINGS:
            raise ValueError(f"--sweep varies {', '.join(SETTINGS)} per member, not {key!r}")
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"--sweep {key}: give a non-empty list of values, got {values!r}")
    keys = list(settings)
    return [{"seed": int(seed), **{k: float(v) for k, v in zip(keys, combo)}}
            for seed in seeds for combo in itertools.product(*(settings[k] for k in keys))]


def member_name(member: dict[str, Any]) -> str:
    """``seed-3``, or ``lr-0.001_weight_decay-0.01_seed-3`` for a hyperparameter member (its folder name)."""
    parts = [f"{k}-{member[k]:g}" for k in SETTINGS if k in member]
    return "_".join(parts + [f"seed-{member['seed']}"])


def _lightning():
    import lightning as L

    return L


class SweepModule(RngCheckpointHooks, _lightning().LightningModule):  # the global RNG (dropout, mixup) in checkpoints
    """N members of one recipe trained as one batched model under Lightning (manual optimisation).

    The stacked parameters, BatchNorm statistics and AdamW moments are buffers of this module and the recipe's
    LR scheduler runs on a holder optimizer with one parameter group per member (its learning rate), so
    Lightning checkpoints hold all of it and ``--ckpt_path`` resumes the sweep exactly.

    Args:
        members: The recipe's model built once per member (:meth:`from_cli` builds them as ``mmalign fit`` does).
        seeds: The seed of each member (or ``specs``: ``[{"seed": s, "lr": ..., "weight_decay": ...}]``).
        specs: Per-member seed and settings (:func:`sweep_members`); ``lr``/``weight_decay`` missing: the recipe's.
    """

    def __init__(self, members: Sequence[nn.Module], seeds: Sequence[int] | None = None,
                 specs: Sequence[dict[str, Any]] | None = None) -> None:
        super().__init__()
        template = members[0]
        if getattr(template, "automatic_optimization", True) is False:
            raise ValueError("a sweep cannot run a recipe with its own optimisation step (grad_cache_chunk): unset it")
        self.automatic_optimization = False
        specs = [dict(s) for s in specs] if specs is not None else [{"seed": int(s)} for s in seeds]
        if len(specs) != len(members):
            raise ValueError(f"{len(members)} members for {len(specs)} member settings")
        self.names = [member_name(s) for s in specs]  # the swept settings and the seed
        lr, wd, betas, eps = _adamw_settings(template)
        for spec in specs:
            spec.setdefault("lr", lr)
            spec.setdefault("weight_decay", wd)
        self.specs = specs
        self.seeds = [s["seed"] for s in specs]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"two members of the sweep are the same run: {self.names}")
        self.template = template  # towers, objectives, hooks of the recipe (its trainable tensors are replaced)
        self._recipe_scheduler = getattr(template, "_scheduler", None)
        self.sweep = Sweep([ModuleMember(m) for m in members], lr=[s["lr"] for s in specs],
                           weight_decay=[s["weight_decay"] for s in specs], betas=betas, eps=eps)
        self._names = list(self.sweep.params)
        self._buffer_names = list(self.sweep.buffers)
        for i, k in enumerate(self._names):  # checkpointed with the module
            self.register_buffer(f"sweep_param_{i}", self.sweep.params[k])
            self.register_buffer(f"sweep_avg_{i}", self.sweep.exp_avg[k])
            self.register_buffer(f"sweep_avg_sq_{i}", self.sweep.exp_avg_sq[k])
        for i, k in enumerate(self._buffer_names):
            self.register_buffer(f"sweep_buffer_{i}", self.sweep.buffers[k])
        self.register_buffer("sweep_steps", torch.zeros((), dtype=torch.long))
        self._holder_params = [nn.Parameter(torch.zeros(())) for _ in specs]  # one LR per member for the scheduler
        self._val: list[dict[str, list[Any]]] = []

    @property
    def towers(self) -> Any:  # what the DataModule connects to (fields, encoders' preprocessing)
        return self.template.towers

    @property
    def objectives(self) -> Any:
        return self.template.objectives

    @classmethod
    def from_cli(cls, parser: Any, config: Any, seeds: Sequence[int] | None = None,
                 settings: dict[str, Sequence[float]] | None = None) -> "SweepModule":
        """Instantiate the recipe's model once per member exactly as LightningCLI does (seed, then classes).

        ``seeds`` default to the recipe's ``seed_everything``; ``settings`` (``--sweep``) add the grid of
        learning rates / weight decays under each seed.
        """
        import random

        import numpy as np

        L = _lightning()
        if not seeds:
            seed = config.get("seed_everything")
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise ValueError("--sweep without --sweep_seeds needs an integer seed_everything in the recipe")
            seeds = [seed]
        specs = sweep_members(seeds, settings)
        state = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
        built: dict[int, nn.Module] = {}
        members = []
        for spec in specs:  # one build per seed: settings members of a seed start from the same initialisation
            if spec["seed"] not in built:
                L.seed_everything(spec["seed"], verbose=False)
                built[spec["seed"]] = parser.instantiate_classes(config).model
            members.append(built[spec["seed"]])
        # the data order (and dropout stream) stays the one a lone fit of the recipe's own seed_everything draws
        torch.random.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])
        return cls(members, specs=specs)

    def _bind(self) -> None:
        """Point the engine at the buffers (after ``.to(device)`` or a checkpoint load replaced them)."""
        for i, k in enumerate(self._names):
            self.sweep.params[k] = getattr(self, f"sweep_param_{i}")
            self.sweep.exp_avg[k] = getattr(self, f"sweep_avg_{i}")
            self.sweep.exp_avg_sq[k] = getattr(self, f"sweep_avg_sq_{i}")
        for i, k in enumerate(self._buffer_names):
            self.sweep.buffers[k] = getattr(self, f"sweep_buffer_{i}")
        like = self.sweep.params[self._names[0]]
        self.sweep.lr, self.sweep.weight_decay = self.sweep.lr.to(like.device), self.sweep.weight_decay.to(like.device)
        self.sweep.steps = int(self.sweep_steps)

    def configure_optimizers(self) -> Any:
        """A holder SGD (never updating anything) with one group per member at its learning rate, and the recipe's
        scheduler on it: stepping it schedules every member's own rate; Lightning checkpoints both."""
        holder = torch.optim.SGD([{"params": [p], "lr": s["lr"]} for p, s in zip(self._holder_params, self.specs)], lr=self.specs[0]["lr"])
        if self._recipe_scheduler is None:
            return holder
        scheduler = self._recipe_scheduler(holder)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError("a sweep steps its scheduler every step: ReduceLROnPlateau (a monitored metric) is not supported")
        return {"optimizer": holder, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _scheduled_lr(self) -> None:
        holder = self.optimizers(use_pl_optimizer=False)
        self.sweep.lr = torch.tensor([g["lr"] for g in holder.param_groups], dtype=self.sweep.lr.dtype, device=self.sweep.lr.device)

    def on_train_start(self) -> None:
        self._bind()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if not batch["meta"]["id"]:
            return None
        self._bind()
        if self._trainer is not None and self._recipe_scheduler is not None:
            self._scheduled_lr()  # this step's rates (the scheduler stepped after the last one)
        alpha = self.template.hparams.get("mixup_alpha") if hasattr(self.template, "hparams") else None
        if alpha:  # one mix for all members, as the lone fit of the recipe draws it
            from mmalign.training.mixup import mixup_batch

            batch = mixup_batch(batch, alpha)
        losses = self.sweep.step(batch)  # [N]
        self.sweep_steps.fill_(self.sweep.steps)
        if self._trainer is None:
            return None
        if self._recipe_scheduler is not None:
            holder = self.optimizers(use_pl_optimizer=False)
            holder.step()  # no gradients: changes nothing; keeps the scheduler's step-order check quiet
            self.lr_schedulers().step()
        if self.template._logs_this_step() if hasattr(self.template, "_logs_this_step") else True:
            self.log("train/loss", losses.mean(), prog_bar=True, batch_size=len(batch["meta"]["id"]))
        self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_completed()  # global_step
        return None

    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.world_size > 1:  # before the strategy wraps the module
            raise ValueError(f"a sweep trains in one process (its vectorised AdamW does not all-reduce gradients); "
                             f"run it with --trainer.devices=1, not on {self.trainer.world_size} processes")

    def on_fit_start(self) -> None:
        self.template._trainer = self.trainer  # the recipe's step-logging rule reads the trainer

    # -- validation: every member's retrieval, the mean as the monitor ------------------------
    def _member_forward(self, i: int, batch: Any) -> dict[str, Tensor]:
        state = {k[len("module."):]: v[i] for k, v in {**self.sweep.params, **self.sweep.buffers}.items()}
        return functional_call(self.template, state, (batch,))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if not batch["meta"]["id"]:
            return
        self._bind()
        losses = self.sweep.losses(batch)
        bs = len(batch["meta"]["id"])
        self.log("val/loss", losses.mean(), batch_size=bs)
        if not hasattr(self.template, "evaluate_collected"):
            return
        if not self._val:
            self._val = [{"embeds": [], "meta": [], "keys": [], "present": []} for _ in range(self.sweep.n)]
        present = batch.get("present", {})
        with torch.no_grad():
            for i, store in enumerate(self._val):
                embeds = self._member_forward(i, batch)
                store["embeds"].append({k: v.detach().float().cpu() for k, v in embeds.items()})
                store["meta"].append(batch["meta"])
                store["keys"].append(batch.get("keys", {}))
                store["present"].append({k: (present[k].cpu() if k in present else torch.ones(bs, dtype=torch.bool)) for k in embeds})

    def on_validation_epoch_end(self) -> None:
        stores, self._val = self._val, []
        if self.trainer.sanity_checking or not stores or not stores[0]["embeds"]:
            return
        from mmalign.training.module import monitor_metrics

        flat: dict[str, float] = {}
        monitors = []
        for name, store in zip(self.names, stores):
            self.template._eval_store.clear()
            self.template._eval_store.update(store)
            collected = self.template.collected_embeddings()
            self.template._eval_store.clear()
            metrics = monitor_metrics(self.template.evaluate_collected(collected), self.template.pair_kinds, "val")
            if "val/R@1" in metrics:
                monitors.append(metrics["val/R@1"])
                flat[f"val/{name}/R@1"] = metrics["val/R@1"]
        if monitors:
            flat["val/R@1"] = sum(monitors) / len(monitors)  # the recipe's ModelCheckpoint keeps the best sweep by it
        self.log_dict(flat, sync_dist=False)

    # -- outputs --------------------------------------------------------------------------------
    def member(self, i: int) -> nn.Module:
        """Member ``i`` as a standalone recipe model with its trained parameters."""
        self._bind()
        trainer, self.template._trainer = getattr(self.template, "_trainer", None), None  # not copied with the member
        try:
            return self.sweep.member(i).module
        finally:
            self.template._trainer = trainer

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            from mmalign.export import training_languages

            root = Path(self.trainer.default_root_dir if self.trainer.log_dir is None else self.trainer.log_dir)
            self.export_members(root / "sweep", languages=training_languages(datamodule=self.trainer.datamodule),
                                metrics=self.trainer.callback_metrics)

    def export_members(self, folder: str | Path, *, checkpoints: bool = True, languages: list[str] | None = None,
                       metrics: dict[str, Any] | None = None, checkpoint: str | None = None, epoch: int | None = None,
                       onnx: bool = False) -> Path:
        """Write ``folder/<member>/``: each member's export and ``folder/ensemble.json`` (the list, with each member's
        seed and settings); with ``checkpoints`` (the end-of-fit ``<run>/sweep``) also each member's Lightning
        checkpoint ``model.ckpt`` (what a lone fit's checkpoint of that member holds, without optimizer state) and,
        under the CLI, the member's recipe ``config.yaml``.

        Args:
            folder: Target folder (created).
            checkpoints: Also write ``model.ckpt`` and ``config.yaml`` per member.
            languages: Training languages recorded in every export.
            metrics: The sweep's metrics (``trainer.callback_metrics``): each export records its member's own,
                ``val/<member>/R@1`` as ``val/R@1``; the sweep's means are not a member's and are left out.
            checkpoint: The sweep checkpoint the weights came from (recorded as provenance).
            epoch: Epoch of the weights (default: the trainer's current epoch).
            onnx: Also write ONNX projectors (:func:`mmalign.export.export_onnx`).
        """
        import json

        from mmalign.export.writer import export_module

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        recipe = self._recipe()
        if epoch is None and self._trainer is not None:
            epoch = self.trainer.current_epoch
        base = self._checkpoint_base() if checkpoints else {}
        for i, name in enumerate(self.names):
            member = self.member(i).cpu()
            config = _member_recipe(recipe, self.specs[i]) if recipe is not None else None
            export_module(member, folder / name, global_step=int(self.sweep_steps), recipe=config, epoch=epoch,
                          languages=languages, metrics=_member_metrics(metrics, name),
                          checkpoint=checkpoint, onnx=onnx)
            if not checkpoints:
                continue
            self._save_member_checkpoint(member, folder / name / "model.ckpt", base)
            if config is not None:
                import yaml

                (folder / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        members = [{"name": n, **s} for n, s in zip(self.names, self.specs)]
        (folder / "ensemble.json").write_text(json.dumps(
            {"members": self.names, "settings": members, "combine": "mean of L2-normalised embeddings"}, indent=1) + "\n")
        return folder

    @contextlib.contextmanager
    def weights_of(self, state_dict: dict[str, Tensor], source: str = "checkpoint") -> Iterator[None]:
        """Hold the stacked members of another checkpoint of this sweep (``state_dict`` of a Lightning checkpoint)
        inside the block, e.g. to export the best one; the module's own weights are put back after.

        Raises:
            ValueError: ``state_dict`` is not a checkpoint of this sweep (members, parameters or shapes differ).
        """
        own = {n: b for n, b in self.named_buffers() if n.startswith("sweep_")}
        bad = sorted(n for n, b in own.items() if n not in state_dict or tuple(state_dict[n].shape) != tuple(b.shape))
        if bad:
            raise ValueError(f"{source} is not a checkpoint of this sweep ({len(self.names)} members {self.names}): "
                             f"missing or other-shaped tensors {bad[:5]}")
        saved = {n: b.detach().clone() for n, b in own.items()}
        try:
            with torch.no_grad():
                for n, b in own.items():
                    b.copy_(state_dict[n])
            self._bind()
            yield
        finally:
            with torch.no_grad():
                for n, b in own.items():
                    b.copy_(saved[n])
            self._bind()

    def _recipe(self) -> dict[str, Any] | None:
        """The CLI's recipe (None outside it), dumped once per trainer: every export of the fit's end reads it."""
        if self._trainer is None:
            return None
        cached = self.__dict__.get("_recipe_of")
        if cached is None or cached[0] is not self._trainer:
            from mmalign.training.callbacks import _recipe_config

            self.__dict__["_recipe_of"] = cached = (self._trainer, _recipe_config(self._trainer))
        return copy.deepcopy(cached[1])

    def _checkpoint_base(self) -> dict[str, Any]:
        """What every member's ``model.ckpt`` holds besides its weights (dumped once for all members)."""
        import lightning as L

        ckpt: dict[str, Any] = {"epoch": 0, "global_step": int(self.sweep_steps), "pytorch-lightning_version": L.__version__}
        if self._trainer is not None:
            ckpt = self.trainer._checkpoint_connector.dump_checkpoint(weights_only=True)
            ckpt.pop("callbacks", None)  # the sweep's ModelCheckpoint state names the sweep's files, not this member's
            ckpt.pop("state_dict", None)  # the stacked members: each file gets its own member's
        ckpt.pop("hparams_name", None)
        return ckpt

    def _save_member_checkpoint(self, member: nn.Module, path: Path, base: dict[str, Any]) -> None:
        hparams = getattr(member, "hparams", None)
        torch.save({**base, "state_dict": member.state_dict(), "hyper_parameters": dict(hparams) if hparams else {}}, path)


def _member_metrics(metrics: dict[str, Any] | None, name: str) -> dict[str, float] | None:
    """Member ``name``'s scalar metrics of a sweep's ``metrics``: ``val/<name>/R@1`` as ``val/R@1``; keys of other
    members and the sweep's own (means over the members) left out."""
    if metrics is None:
        return None
    out = {}
    for key, value in metrics.items():
        if f"/{name}/" in key and getattr(value, "numel", lambda: 1)() == 1:
            out[key.replace(f"/{name}/", "/", 1)] = float(value)
    return out


def _member_recipe(recipe: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The recipe one member is (``mmalign fit`` of it trains that member alone): the sweep keys dropped,
    ``seed_everything`` and the optimizer's ``lr``/``weight_decay`` set to the member's."""
    config = copy.deepcopy(recipe)
    for key in ("sweep_seeds", "sweep", "config", "ckpt_path"):
        config.pop(key, None)
    config["seed_everything"] = spec["seed"]
    opt = config.get("model", {}).get("init_args", {}).get("optimizer")
    if isinstance(opt, dict):
        args = opt.setdefault("init_args", {})
        args["lr"], args["weight_decay"] = spec["lr"], spec["weight_decay"]
    return config


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
