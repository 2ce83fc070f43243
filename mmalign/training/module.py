"""The LightningModule shared by every embedding recipe: towers + objectives, set from YAML.

Over 400 lines on purpose: the training step, its GradCache variant, presence masks and the evaluation routing
share the same tower/objective bookkeeping; split apart they would pass that state between modules.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from encoders.base import EncoderOutput
from mmalign.training.gradcache import check_per_sample, chunk_ranges, grad_cache_backward, slice_rows
from mmalign.training.base import FrozenBackboneModule
from mmalign.training.losses import group_ids
from mmalign.training.mixup import mixup_batch
from mmalign.training.towers import Objective, Tower


def _is_batched(x: Tensor) -> bool:
    """Whether ``x`` is a vmap batch (a sweep's members): collectives are not run inside vmap."""
    check = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
    return bool(check(x)) if check is not None else False


def presence(batch: dict[str, Any], name: str) -> Tensor | None:
    """``[B]`` bool: the rows of ``batch`` that hold tower ``name``'s field; None when every row does."""
    mask = batch.get("present", {}).get(name)
    return None if mask is None or bool(mask.all()) else mask


def both_present(present: dict[str, Tensor] | None, towers: list[str] | tuple[str, ...]) -> Tensor | None:
    """``[B]`` bool rows that hold every tower of ``towers`` (None: all rows)."""
    masks = [present[t] for t in towers if present and present.get(t) is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = out & m
    return out


def scatter_rows(x: Tensor, mask: Tensor) -> Tensor:
    """``[B, D]`` with the rows of ``x`` (``[mask.sum(), D]``) where ``mask`` is True, zeros elsewhere (keeps the graph)."""
    idx = mask.nonzero().squeeze(1)
    return x.new_zeros((mask.shape[0],) + tuple(x.shape[1:])).index_copy(0, idx, x)


def retrieval_pairs(
    towers: list[str], trained: list[list[str]], retrieval: list[list[str]] | None = None
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The tower pairs evaluated and their kind: ``([(a, b)], {"a|b": "trained" | "emergent"})``.

    Args:
        towers: Tower names of the space.
        trained: The objectives' tower pairs.
        retrieval: Pairs asked for (``None``: the trained pairs, then every other pair of towers, emergent).

    Raises:
        ValueError: A name in ``retrieval`` is not a tower (with the closest tower name), or a pair is not two
            distinct towers.
    """
    import difflib
    import itertools

    bound = {frozenset(p) for p in trained}
    if retrieval is None:
        pairs = [tuple(p) for p in trained] + list(itertools.combinations(towers, 2))
    else:
        pairs = []
        for pair in retrieval:
            pair = list(pair) if isinstance(pair, (list, tuple)) else [pair]
            for name in pair:
                if name not in towers:
                    close = difflib.get_close_matches(str(name), towers, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ValueError(f"retrieval names tower {name!r}, which is not a tower (towers: {towers}){hint}")
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"a retrieval pair is two distinct towers, got {pair}")
            pairs.append(tuple(pair))
    out: list[tuple[str, str]] = []
    for a, b in pairs:  # one order per pair: the first seen (objectives' order for trained pairs)
        if not any({a, b} == set(p) for p in out):
            out.append((a, b))
    return out, {f"{a}|{b}": ("trained" if frozenset((a, b)) in bound else "emergent") for a, b in out}


def in_batch_r1(a: Tensor, b: Tensor) -> Tensor:
    """Fraction of rows of ``a`` whose most similar row of ``b`` (cosine) is the paired one."""
    a, b = nn.functional.normalize(a.float(), dim=-1), nn.functional.normalize(b.float(), dim=-1)
    return (a @ b.T).argmax(dim=1).eq(torch.arange(len(a), device=a.device)).float().mean()


def train_monitors(trainer: Any) -> bool:
    """Whether a callback or the LR scheduler monitors a ``train/`` metric (read at epoch ends).

    Cached on the trainer per callback list: each self.log costs Lightning ~1.5 ms of bookkeeping on a CPU, so
    epoch ends log train metrics only when something reads them there (``ModelCheckpoint``/``EarlyStopping``
    with ``monitor="train/..."``, a ``ReduceLROnPlateau`` on a train metric).
    """
    key = tuple(id(c) for c in trainer.callbacks)
    cached = getattr(trainer, "_mmalign_train_monitors", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    monitors = [getattr(c, "monitor", None) for c in trainer.callbacks]
    monitors += [getattr(cfg, "monitor", None) for cfg in getattr(trainer, "lr_scheduler_configs", None) or ()]
    found = any(isinstance(m, str) and m.startswith("train/") for m in monitors)
    trainer._mmalign_train_monitors = (key, found)
    return found


class AlignmentModule(FrozenBackboneModule):
    """Frozen encoders -> trainable projectors (towers) and weighted objectives between towers.

    Args:
        towers: Named towers, e.g. ``{"student": ..., "teacher": ...}`` or ``{"image": ..., "text": ...}``.
        objectives: Losses between pairs of towers.
        embed_dim: Shared space size given to projector factories. ``None``: taken from a tower
            without projector (a frozen teacher defines the space).
        optimizer: Optimizer factory over the trainable parameters (projectors, temperatures).
        scheduler: Optional LR scheduler factory (stepped every optimizer step).
        retrieval: Tower pairs evaluated in validation/test (both directions, per language), each on the
            rows that hold both towers. Default: every pair of towers in the space. A pair that an objective
            binds is *trained*, any other *emergent* (:attr:`pair_kinds`); names are checked against the towers.
            The checkpoint monitor ``val/R@1`` is the mean R@1 over every (TRAINED pair, language, direction),
            each language ranked against its own gallery (never the pooled ``all`` row; :func:`monitor_metrics`),
            so adding an emergent pair never changes it; emergent pairs are averaged into ``val/emergent/R@1``.
        grad_cache_chunk: Rows per chunk for GradCache (Gao et al., 2021; :mod:`mmalign.training.gradcache`):
            the training step projects the whole batch without a graph, takes the gradient of the
            full-batch loss w.r.t. the embeddings, then re-projects ``grad_cache_chunk`` rows at a time
            with a graph. Gradients equal the plain step's, so the contrastive batch (and its
            negatives) can exceed what the projector graph fits in memory. Switches the module to
            Lightning manual optimization (``trainer.gradient_clip_val`` and
            ``trainer.accumulate_grad_batches`` are then unavailable: grow ``batch_size`` instead).
            ``None`` (default): plain step, automatic optimization.
        mixup_alpha: Latent mixup of cached features in training steps (FuseMix, Vouitsis et al., CVPR 2024;
            :mod:`mmalign.training.mixup`): each batch mixes every row with a partner row by one
            ``lam ~ Beta(alpha, alpha)``, the same ``lam`` and partner for all towers of the row. FuseMix uses 1.
            ``None`` (default): off. Needs cached features (``data.init_args.cache_dir``).
    """

    def __init__(
        self,
        towers: dict[str, Tower],
        objectives: list[Objective],
        embed_dim: int | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        retrieval: list[list[str]] | None = None,
        grad_cache_chunk: int | None = None,
        mixup_alpha: float | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.save_hyperparameters(ignore=["towers", "objectives", "optimizer", "scheduler"])
        self.towers = nn.ModuleDict(towers)
        self.objectives = nn.ModuleList(objectives)
        self.embed_dim = self._build_towers(embed_dim)
        for obj in self.objectives:
            for name in obj.towers:
                if name not in self.towers:
                    raise ValueError(f"objective names tower {name!r}; towers are {sorted(self.towers)}")
        self.retrieval_pairs, self.pair_kinds = retrieval_pairs(list(self.towers), [o.towers for o in self.objectives], retrieval)
        self._eval_store: dict[str, list[Any]] = defaultdict(list)
        if grad_cache_chunk is not None:
            chunk_ranges(1, grad_cache_chunk)  # validates the size
            check_per_sample({name: tower.projector for name, tower in self.towers.items()})
            self.automatic_optimization = False

    def _build_towers(self, embed_dim: int | None) -> int:
        if embed_dim is None:
            teachers = [t for t in self.towers.values() if t._projector_factory is None]
            if not teachers:
                raise ValueError("set embed_dim: every tower has a projector, so the shared size is not implied")
            embed_dim = teachers[0].encoder.output_dim
        for name, tower in self.towers.items():
            out = tower.build(embed_dim)
            if out != embed_dim:
                raise ValueError(f"tower {name!r} outputs {out}-d vectors but the shared space is {embed_dim}-d")
        return embed_dim

    # -- forward ----------------------------------------------------------------------------
    def tower_features(self, name: str, batch: dict[str, Any]) -> EncoderOutput | None:
        """Encoder output of tower ``name``: from cached features if the batch has them, else encoded."""
        cached = batch.get("features", {}).get(name)
        if cached is not None:
            return EncoderOutput(**cached).float() if isinstance(cached, dict) else cached
        inputs = batch.get("inputs", {}).get(name)
        if inputs is None:
            return None
        return self.towers[name].encoder(inputs)

    def absent_embeds(self, name: str, batch_size: int, like: Tensor | None = None) -> Tensor:
        """``[B, D]`` zeros for a tower no row of the batch feeds, tied to its parameters with a zero weight, so
        that DDP sees every projector used on every rank (another rank's batch may feed it)."""
        tower = self.towers[name]
        params = [p for p in tower.parameters() if p.requires_grad]
        device = like.device if like is not None else self.device
        zeros = torch.zeros(batch_size, tower.out_dim, device=device)
        return zeros + 0.0 * sum(p.sum() for p in params) if params else zeros

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``{tower_name: embeds [B, D]}`` for every tower the batch has inputs or features for.

        Partial-modality batches (``batch["present"] = {tower: [B] bool}``) carry inputs/features for the
        present rows only; their embeddings are scattered back to ``[B, D]`` with zero rows where the field is
        absent, and :meth:`compute_losses` runs each objective on the rows that hold both of its towers.
        """
        embeds = {}
        batch_size = len(batch["meta"]["id"])
        for name, tower in self.towers.items():
            feats = self.tower_features(name, batch)
            mask = presence(batch, name)
            if feats is None:
                if name in batch.get("present", {}):  # declared, but no row of this batch has the field
                    embeds[name] = self.absent_embeds(name, batch_size)
                continue
            x = tower.project(feats)
            embeds[name] = scatter_rows(x, mask) if mask is not None else x
        if self.training:
            self.track_means(embeds, batch.get("present"))
        return embeds

    def track_means(self, embeds: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> None:
        """Fold a training batch into the running output mean of every ``center=True`` tower
        (:meth:`~mmalign.training.towers.Tower.track_mean`), on the rows that hold the tower's field.

        Under DDP the sums and row counts of every rank are all-reduced first (one collective per step, the same
        on every rank: a tower this rank's batch lacks adds zeros), so every rank keeps the same mean. Inside a
        sweep's vmap (each member its own mean) the collective is skipped: a DDP sweep keeps each rank's mean.
        """
        names = [n for n, t in self.towers.items() if t.center]
        if not names:
            return
        like = next(iter(embeds.values()), None)
        device = like.device if like is not None else self.device
        rows = []  # per tower [D + 1]: sum of outputs, row count (built out of place: a sweep vmaps this)
        for name in names:
            x = embeds.get(name)
            if x is None:
                rows.append(torch.zeros(self.embed_dim + 1, device=device))
                continue
            x = x.detach().float()
            keep = present.get(name) if present else None
            keep = torch.ones(len(x), device=x.device) if keep is None else keep.to(device=x.device, dtype=x.dtype)
            rows.append(torch.cat([(x * keep[:, None]).sum(0), keep.sum()[None]]))
        stats = torch.stack(rows)  # [T, D + 1]
        if (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1 and not _is_batched(stats)):
            torch.distributed.all_reduce(stats)
        for i, name in enumerate(names):
            self.towers[name].track_mean(stats[i, :-1], rows=stats[i, -1])

    def compute_losses(
        self, embeds: dict[str, Tensor], groups: Tensor | None = None, present: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Weighted loss terms by name: ``clip_loss``..., prefixed ``a-b/`` when objectives span several tower pairs.

        Args:
            embeds: ``{tower: [B, D]}``.
            groups: ``[B]`` int64 group ids of the rows (:meth:`batch_groups`), for contrastive losses with
                ``false_negatives="mask"``.
            present: ``{tower: [B] bool}`` rows holding each tower's field (``batch["present"]``; a missing
                tower or None: every row). Each objective runs on the rows that hold both of its towers; one
                with no such row in the batch adds no term.
        """
        prefix = len({tuple(o.towers) for o in self.objectives}) > 1
        losses: dict[str, Tensor] = {}
        for obj in self.objectives:
            if all(t in embeds for t in obj.towers):
                for key, value in obj(embeds, groups, both_present(present, obj.towers)).items():
                    key = f"{'-'.join(obj.towers)}/{key}" if prefix else key
                    losses[key] = losses.get(key, 0) + value
        if not losses and not present:
            raise ValueError(f"no objective could run: the batch fed towers {sorted(embeds)}")
        return losses

    def batch_groups(self, batch: dict[str, Any]) -> Tensor | None:
        """``[B]`` int64 ids of the rows' ``concept`` (rows of one concept are not each other's negatives).

        None when no objective masks false negatives, so plain recipes pay nothing.
        """
        if not any(getattr(o.loss, "false_negatives", "keep") == "mask" for o in self.objectives):
            return None
        meta = batch["meta"]
        # A row without a concept is its own group; its id keeps it distinct across DDP ranks too.
        labels = [c if c is not None else f"\0row:{rid}" for c, rid in zip(meta["concept"], meta["id"])]
        return group_ids(labels, device=self.device)

    # -- large batches (GradCache) -------------------------------------------------------------
    def chunked_features(self, name: str, batch: dict[str, Any], ranges: list[tuple[int, int]]) -> list[EncoderOutput] | None:
        """Encoder outputs of tower ``name`` per row range: cached features sliced, or encoded chunk by chunk.

        Frozen encoders run once per chunk (no graph); both GradCache passes reuse these features.
        Partial batches: features exist for the present rows only, so chunk ``[s, e)`` of the batch is the
        present rows ``[cum[s], cum[e])`` of the features (``None`` for a chunk without any).
        """
        batch_size = len(batch["meta"]["id"])
        mask = presence(batch, name)
        if mask is not None:
            cum = [0] + torch.cumsum(mask.long(), 0).tolist()
            ranges = [(cum[s], cum[e]) for s, e in ranges]
            batch_size = cum[-1]
        cached = batch.get("features", {}).get(name)
        if cached is not None:
            feats = EncoderOutput(**cached).float() if isinstance(cached, dict) else cached
            return [feats[s:e] if e > s else None for s, e in ranges]
        inputs = batch.get("inputs", {}).get(name)
        if inputs is None:
            return None
        return [self.towers[name].encoder(slice_rows(inputs, s, e, batch_size)) if e > s else None for s, e in ranges]

    def grad_cache_step(
        self, batch: dict[str, Any], backward: Callable[[Tensor], None] | None = None
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Accumulate the full-batch gradient into ``.grad`` with GradCache; returns (loss, losses, embeds), detached.

        Args:
            batch: A training batch (raw inputs or cached features).
            backward: Backpropagates a scalar; default ``self.manual_backward`` when attached to a
                trainer (precision plugin, DDP), else ``Tensor.backward``.
        """
        chunk = self.hparams.get("grad_cache_chunk") or len(batch["meta"]["id"])
        ranges = chunk_ranges(len(batch["meta"]["id"]), chunk)
        feats = {name: f for name in self.towers if (f := self.chunked_features(name, batch, ranges)) is not None}
        present = batch.get("present", {})
        for name in present:
            if name in self.towers and name not in feats:  # declared, no row of the batch has it
                feats[name] = [None] * len(ranges)
        attached = self._trainer is not None
        if backward is None:
            backward = self.manual_backward if attached else Tensor.backward

        def project(i: int) -> dict[str, Tensor]:
            s, e = ranges[i]
            out = {}
            for name, f in feats.items():
                mask = presence(batch, name)
                if f[i] is None:
                    out[name] = self.absent_embeds(name, e - s)
                else:
                    x = self.towers[name].project(f[i])
                    out[name] = scatter_rows(x, mask[s:e]) if mask is not None else x
            return out

        def sync(last: bool) -> Any:
            block = getattr(self.trainer.strategy, "block_backward_sync", None) if attached else None
            return contextlib.nullcontext() if last or block is None else block()

        groups = self.batch_groups(batch)
        out = grad_cache_backward(
            project, len(ranges), lambda embeds: self.compute_losses(embeds, groups, present), backward=backward, sync=sync
        )
        if self.training:  # once per row (the chunks were projected twice: without and with a graph)
            self.track_means(out.embeds, present)
        return out.loss, out.losses, out.embeds

    # -- Lightning hooks ---------------------------------------------------------------------
    def _logs_this_step(self) -> bool:
        """Whether step metrics are logged on this step: when the trainer writes them to its loggers
        (``trainer.log_every_n_steps``), on the last step of the fit, and on the last batch of an epoch when a
        callback monitors a train metric (:func:`train_monitors`).

        Lightning keeps only the last on-step value between logger writes, so metrics logged on the other
        steps would be discarded anyway; skipping them skips their cost (result bookkeeping, the in-batch R@1
        matmul) on every step. Callbacks that monitor a train metric (``EarlyStopping``,
        ``ModelCheckpoint(monitor="train/loss")``) read a fresh value at every epoch end as before, and the fit's
        end always has one. The progress bar's ``train/loss`` updates when the loggers do.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        if trainer._logger_connector.should_update_logs:  # the rule Lightning itself writes by
            return True
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step + 1:
            return True  # the fit's last step: what callbacks and the export read after the fit
        if not trainer.is_last_batch:
            return False
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        return bool(last_epoch or train_monitors(trainer))  # epoch ends, when something reads them there

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if not batch["meta"]["id"]:
            # every item of the batch was skipped under on_error="skip" (counted by BadInputCallback);
            # Lightning skips the step. Under DDP every rank must agree, so use skip with single-process runs
            # or clean data first (``mmalign cache`` drops bad items once, before training).
            return None
        if self.hparams.get("mixup_alpha"):
            batch = mixup_batch(batch, self.hparams["mixup_alpha"])
        if self.automatic_optimization:
            embeds = self(batch)
            losses = self.compute_losses(embeds, self.batch_groups(batch), batch.get("present"))
            if not losses:  # no row of this batch holds both towers of any objective
                return None
            loss = torch.stack(list(losses.values())).sum()
        else:  # GradCache: the step does its own backward passes and the optimizer step
            optimizer = self.optimizers()
            optimizer.zero_grad()
            loss, losses, embeds = self.grad_cache_step(batch)
            optimizer.step()
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
        if self._logs_this_step():
            bs = len(batch["meta"]["id"])
            self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=bs)
            self.log("train/loss", loss, prog_bar=True, batch_size=bs)
            for a, b in self.retrieval_pairs:
                if a in embeds and b in embeds:
                    both = both_present(batch.get("present"), (a, b))
                    x_a, x_b = (embeds[a], embeds[b]) if both is None else (embeds[a][both], embeds[b][both])
                    if len(x_a):
                        self.log(f"train/{a}->{b}/inbatch_R@1", in_batch_r1(x_a, x_b), batch_size=bs)
        return loss

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        if not batch["meta"]["id"]:  # every item skipped under on_error="skip"
            return
        embeds = self(batch)
        losses = self.compute_losses(embeds, self.batch_groups(batch), batch.get("present"))
        bs = len(batch["meta"]["id"])
        if losses:
            self.log_dict({f"{stage}/{k}": v for k, v in losses.items()}, batch_size=bs, sync_dist=True)
            self.log(f"{stage}/loss", torch.stack(list(losses.values())).sum(), batch_size=bs, sync_dist=True, prog_bar=True)
        self._eval_store["meta"].append(batch["meta"])
        self._eval_store["keys"].append(batch.get("keys", {}))
        self._eval_store["embeds"].append({k: v.detach().float().cpu() for k, v in embeds.items()})
        present = batch.get("present", {})
        self._eval_store["present"].append(
            {k: (present[k].cpu() if k in present else torch.ones(bs, dtype=torch.bool)) for k in embeds})

    def collected_embeddings(self) -> dict[str, Any]:
        """Concatenate what the last evaluation epoch stored: embeds per tower, meta and keys."""
        store = self._eval_store
        embeds = {k: torch.cat([e[k] for e in store["embeds"]]) for k in (store["embeds"][0] if store["embeds"] else {})}
        meta = {k: sum((m[k] for m in store["meta"]), []) for k in (store["meta"][0] if store["meta"] else {})}
        keys = {k: sum((m[k] for m in store["keys"]), []) for k in (store["keys"][0] if store["keys"] else {})}
        present = {k: torch.cat([p[k] for p in store["present"]]) for k in embeds} if store.get("present") else {}
        return {"embeds": embeds, "meta": meta, "keys": keys, "present": present}

    def evaluate_collected(self, collected: dict[str, Any]) -> dict[str, Any]:
        """Per-language retrieval in both directions for every configured tower pair."""
        from mmalign.evaluation import per_language_retrieval

        results: dict[str, Any] = {}
        for a, b in self.retrieval_pairs:
            if a not in collected["embeds"] or b not in collected["embeds"]:
                continue
            embeds, meta, keys = _rows_with(collected, (a, b))
            if not meta["lang"]:
                continue
            kwargs = dict(
                labels=meta["concept"], a_keys=keys.get(self.towers[a].field), b_keys=keys.get(self.towers[b].field),
                a_name=a, b_name=b,
            )
            per_lang = per_language_retrieval(embeds[a], embeds[b], langs=meta["lang"], **kwargs)
            if len(per_lang) > 1:  # every language together, deduplicated across languages too
                for side, name in (("a_keys", a), ("b_keys", b)):
                    if kwargs[side] is not None and self.towers[name].field == "text":
                        # the same string may name different concepts in two languages ("crayon" en/fr)
                        kwargs[side] = [f"{lang}:{k}" for lang, k in zip(meta["lang"], kwargs[side])]
                per_lang["all"] = per_language_retrieval(embeds[a], embeds[b], langs=["all"] * len(embeds[a]), **kwargs)["all"]
            else:
                per_lang["all"] = next(iter(per_lang.values()))
            results[f"{a}|{b}"] = per_lang
        return results

    def _eval_epoch_end(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            self._eval_store.clear()
            return
        collected = self.collected_embeddings()
        self._eval_store.clear()
        if not collected["embeds"]:
            return
        results = self.evaluate_collected(collected)
        self.last_eval = {"stage": stage, "results": results, "collected": collected}
        self.last_eval["kinds"] = {pair: self.pair_kinds.get(pair, "emergent") for pair in results}
        flat = monitor_metrics(results, self.pair_kinds, stage)
        self.log_dict(flat, sync_dist=False)


def monitor_metrics(results: dict[str, Any], kinds: dict[str, str], stage: str = "val") -> dict[str, float]:
    """The scalars an evaluation epoch logs, the checkpoint monitor ``{stage}/R@1`` among them.

    ``{stage}/{lang}/{direction}/{R@1,R@5,MRR}`` for every pair, language (and the pooled ``all`` row) and direction;
    ``{stage}/mean/{direction}/R@1``: the unweighted mean over the languages of one direction (the eval report's
    *mean* row). The monitor ``{stage}/R@1`` is the unweighted mean of R@1 over every (TRAINED pair, language,
    direction): each language's queries ranked against that language's gallery only (deduplicated by item: one
    gallery item per concept in the recipes' data), never the pooled ``all`` row, in which a query may hit any of
    its concept's items in every language (a pivot recipe's teacher->student query would count a hit on any of 12
    translations). Emergent pairs go to ``{stage}/emergent/R@1`` (same definition), so adding one never moves the
    monitor. Languages are those evaluated (``data.eval_languages``), each weighing the same.
    """
    flat: dict[str, float] = {}
    r1s: dict[str, list[float]] = {"trained": [], "emergent": []}
    for pair, per_lang in results.items():
        kind = kinds.get(pair, "emergent")
        per_direction: dict[str, list[float]] = {}
        for lang, directions in per_lang.items():
            for direction, metrics in directions.items():
                for metric, value in metrics.items():
                    if metric in ("R@1", "R@5", "MRR"):
                        flat[f"{stage}/{lang}/{direction}/{metric}"] = float(value)
                if lang != "all":
                    per_direction.setdefault(direction, []).append(float(metrics["R@1"]))
                    r1s[kind].append(float(metrics["R@1"]))
        for direction, values in per_direction.items():
            flat[f"{stage}/mean/{direction}/R@1"] = sum(values) / len(values)
    if r1s["trained"]:
        flat[f"{stage}/R@1"] = sum(r1s["trained"]) / len(r1s["trained"])
    if r1s["emergent"]:
        flat[f"{stage}/emergent/R@1"] = sum(r1s["emergent"]) / len(r1s["emergent"])
    return flat


def _rows_with(collected: dict[str, Any], towers: tuple[str, ...]) -> tuple[dict[str, Tensor], dict[str, list], dict[str, list]]:
    """``(embeds, meta, keys)`` of the collected rows that hold every tower of ``towers``."""
    embeds, meta, keys = collected["embeds"], collected["meta"], collected["keys"]
    both = both_present(collected.get("present"), towers)
    if both is None or bool(both.all()):
        return embeds, meta, keys
    idx = both.nonzero().squeeze(1).tolist()
    pick = lambda values: [values[i] for i in idx]  # noqa: E731
    return ({k: v[both] for k, v in embeds.items()}, {k: pick(v) for k, v in meta.items()},
            {k: pick(v) for k, v in keys.items()})
