"""Lightning callbacks of mmalign (usable from a recipe's ``trainer.callbacks``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

#: The stable names a run's checkpoint folder holds (``--ckpt_path best`` / ``last`` resolve to them).
BEST_NAME, LAST_NAME = "best.ckpt", "last.ckpt"


class ExportOnFitEnd(L.Callback):
    """Write an export (``config.json`` + ``model.safetensors``) when ``fit`` ends.

    The one end-of-fit exporter of both export kinds: an :class:`~mmalign.training.module.AlignmentModule`
    gives an embedding export, a :class:`~mmalign.captioning.PrefixCaptioningModule` a captioner export (its
    ``export_dir`` argument runs this callback). Weights holding NaN/Inf are refused, not exported.

    In a recipe::

        trainer:
          callbacks:
            - class_path: mmalign.training.callbacks.ExportOnFitEnd
              init_args: {output: exports/lit}

    On a sweep (``mmalign fit --sweep_seeds/--sweep``, :class:`~mmalign.training.sweep.SweepModule`) it writes one
    export per member, ``<output>/<member>/``, and ``<output>/ensemble.json`` (docs/scaling.md section 5).

    Args:
        output: Export directory. Default: ``<trainer.log_dir or default_root_dir>/export``.
        onnx: Also write ONNX projectors (see :func:`mmalign.export.export_onnx`).
        best: Export the best checkpoint of the trainer's ``ModelCheckpoint`` (if it has one)
            instead of the weights the module holds at the end of fit.
    """

    def __init__(self, output: str | None = None, onnx: bool = False, best: bool = False) -> None:
        super().__init__()
        self.output = output
        self.onnx = onnx
        self.best = best
        self.path: Path | None = None  # where the last export went

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from mmalign.export import export_module, load_checkpoint, load_export_state, training_languages

        ckpt_cb = trainer.checkpoint_callback
        checkpoint = None
        if ckpt_cb is not None:
            checkpoint = getattr(ckpt_cb, "best_model_path", "") if self.best else getattr(ckpt_cb, "last_model_path", "")
            checkpoint = checkpoint or getattr(ckpt_cb, "best_model_path", "") or None
        epoch, step = trainer.current_epoch, trainer.global_step
        from mmalign.training.sweep import SweepModule

        if isinstance(pl_module, SweepModule):  # N members: one export each (its template holds no trained weights)
            self.path = self._export_sweep(trainer, pl_module, checkpoint)
            rank_zero_info(f"mmalign: exported the sweep's {len(pl_module.names)} members to {self.path}")
            return
        if self.best and checkpoint:
            state = load_checkpoint(checkpoint)
            load_export_state(pl_module, state["state_dict"], checkpoint)
            epoch, step = state.get("epoch", epoch), state.get("global_step", step)
        output = Path(self.output) if self.output else Path(trainer.log_dir or trainer.default_root_dir) / "export"
        self.path = export_module(
            pl_module,
            output,
            languages=training_languages(datamodule=trainer.datamodule),
            recipe=_recipe_config(trainer),
            metrics={k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1},
            checkpoint=checkpoint,
            epoch=epoch,
            global_step=step,
            onnx=self.onnx,
        )
        rank_zero_info(f"mmalign: exported projectors to {self.path}")

    def _export_sweep(self, trainer: L.Trainer, sweep: Any, checkpoint: str | None) -> Path:
        """A sweep (``mmalign fit --sweep_seeds/--sweep``): ``<output>/<member>/`` holds each member's export and
        ``<output>/ensemble.json`` the list, the layout of the sweep's own ``<run>/sweep`` without its ``model.ckpt``
        and ``config.yaml``. ``best``: the members of the best sweep checkpoint (the one ``ModelCheckpoint`` kept by
        the members' mean monitor); the module keeps its final weights, so ``<run>/sweep`` still gets those."""
        from mmalign.export import load_checkpoint, training_languages

        output = Path(self.output) if self.output else Path(trainer.log_dir or trainer.default_root_dir) / "export"
        kwargs = dict(checkpoints=False, languages=training_languages(datamodule=trainer.datamodule),
                      metrics=dict(trainer.callback_metrics), checkpoint=checkpoint, onnx=self.onnx)
        if not (self.best and checkpoint):
            return sweep.export_members(output, **kwargs)
        state = load_checkpoint(checkpoint)
        with sweep.weights_of(state["state_dict"], checkpoint):
            return sweep.export_members(output, epoch=state.get("epoch"), **kwargs)


def _recipe_config(trainer: L.Trainer) -> dict[str, Any] | None:
    """The full config LightningCLI parsed (held by its SaveConfigCallback), or None outside the CLI."""
    import yaml
    from lightning.pytorch.cli import SaveConfigCallback

    for cb in trainer.callbacks:
        if isinstance(cb, SaveConfigCallback):
            return yaml.safe_load(cb.parser.dump(cb.config, skip_none=False, skip_validation=True))
    return None


# -- best.ckpt: a stable name for the best checkpoint of a run ---------------------------------------------------

def link_atomically(target: str | os.PathLike, link: str | os.PathLike) -> Path:
    """Point ``link`` at ``target`` (a file in the same folder) in one ``os.replace``: readers see the old or the
    new checkpoint, never a missing or half-written one. A relative symlink where the file system allows it
    (``ls -l`` shows which epoch is best), else a copy."""
    target, link = Path(target), Path(link)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(target, link.parent), tmp)
    except OSError:  # no symlinks here (some Windows and network file systems): copy, still atomically
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)
    return link


class BestCheckpoint(Checkpoint):
    """Keep ``best.ckpt`` beside the trainer's ``ModelCheckpoint`` files, pointing at its current best.

    ``ModelCheckpoint`` names its files by epoch and step (``epoch=44-step=315.ckpt``) and ``last.ckpt``
    (``save_last: true``), so "the best checkpoint of a run" had no stable name, and ``--ckpt_path best`` only
    worked in the process that trained. The mmalign CLI attaches this callback to every run: after each save it
    re-points ``<checkpoint dir>/best.ckpt`` (atomically) when the best changes, and keeps ``last.ckpt`` the latest
    state at the fit's end (:meth:`_fresh_last`). Runs without a ``ModelCheckpoint`` (the tiny overlays) write nothing.

    A :class:`~lightning.pytorch.callbacks.Checkpoint` so Lightning calls it with the monitoring callbacks,
    after ``ModelCheckpoint`` saved (``on_train_epoch_end`` runs those in a second pass). Add it after a
    ``ModelCheckpoint`` (``trainer.checkpoint_callback`` is the first ``Checkpoint`` of the list).
    """

    def __init__(self) -> None:
        super().__init__()
        self._linked: str | None = None
        self._last_step: int | None = None  # the step of the last.ckpt this callback wrote

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning moves ModelCheckpoint callbacks to the end of the list; run after them, so best.ckpt follows
        # a save within the same hook. (A new list: the loop calling setup iterates over the old one.)
        if trainer.checkpoint_callbacks:
            trainer.callbacks = [cb for cb in trainer.callbacks if cb is not self] + [self]

    def _sync(self, trainer: L.Trainer) -> None:
        cb = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
        best = getattr(cb, "best_model_path", "") or ""
        if not trainer.is_global_zero or not best or not getattr(cb, "dirpath", None):
            return
        if Path(best).resolve().parent != Path(cb.dirpath).resolve():
            return  # the best of another run's folder (restored by --ckpt_path on resume): not this folder's to link
        link = Path(cb.dirpath) / BEST_NAME
        if Path(best).resolve() == link.resolve() and not link.is_symlink():
            return  # ModelCheckpoint itself writes best.ckpt (filename: best)
        if best == self._linked and link.exists():
            return
        if Path(best).is_file():
            link_atomically(best, link)
            self._linked = best

    def _fresh_last(self, trainer: L.Trainer) -> None:
        """At the fit's end, make ``last.ckpt`` the run's FINAL state. Lightning 2.6's ``save_last=True`` copies a
        checkpoint only when a top-k one is saved in the same step, so once the monitor stops improving
        ``last.ckpt`` stays at the best epoch, and ``--ckpt_path last`` (to train on, or to export the final weights)
        would silently restart from there. When no ``ModelCheckpoint`` saved at the last step, save ``last.ckpt``
        here (every rank calls it: the strategy writes on rank 0). Only at the end: mid-fit, the callbacks' hook
        order is not ours to rely on, and a second writer of ``last.ckpt`` would make ``ModelCheckpoint`` version
        its own (``last-v1.ckpt``)."""
        savers = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        lasts = [c for c in savers if c.save_last is True]
        if len(lasts) != 1:
            return  # no last.ckpt asked for, or several callbacks writing one: theirs to keep
        cb = lasts[0]
        if not getattr(cb, "dirpath", None) or "{" in cb.CHECKPOINT_NAME_LAST or cb.monitor is None:
            return
        if getattr(cb, "_every_n_train_steps", 0) or getattr(cb, "_train_time_interval", None):
            return  # step/time-scheduled saves: each is a top-k save and refreshes last.ckpt
        step = trainer.global_step
        if step == 0 or self._last_step == step or any(
                getattr(c, "_last_global_step_saved", step) == step for c in savers):
            return  # nothing trained, or a ModelCheckpoint saved at this step (and wrote last.ckpt)
        trainer.save_checkpoint(os.path.join(cb.dirpath, f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"))
        self._last_step = step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync(trainer)
        self._fresh_last(trainer)


#: ``--ckpt_path`` values resolved from the run folder, and the file each names.
CKPT_ALIASES = {"best": BEST_NAME, BEST_NAME: BEST_NAME, "last": LAST_NAME, LAST_NAME: LAST_NAME}


def checkpoint_dirs(trainer: L.Trainer | None, root_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where this recipe's runs keep checkpoints, as ``ModelCheckpoint`` lays them out: its ``dirpath`` when a
    recipe sets one, else ``<logger root>/version_*/checkpoints`` (TensorBoard/CSV loggers, every version) and
    ``<default_root_dir>/checkpoints`` (no logger), ``<default_root_dir>/lightning_logs/version_*/checkpoints``.
    Without a trainer, only the last two, under ``root_dir`` (default: the working directory)."""
    dirs: list[Path] = []
    loggers: list[Any] = []
    if trainer is not None:
        dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]  # set in a recipe
        loggers = list(trainer.loggers)
    root = Path(root_dir if root_dir is not None else (trainer.default_root_dir if trainer is not None else "."))
    roots = [Path(r) for r in (getattr(lg, "root_dir", None) for lg in loggers) if r] + [root / "lightning_logs"]
    for r in roots:
        dirs += sorted(p for p in r.glob("*/checkpoints") if p.is_dir())
    dirs.append(root / "checkpoints")
    seen, out = set(), []
    for d in dirs:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def find_run_checkpoint(trainer: L.Trainer | None, name: str = BEST_NAME, root_dir: str | os.PathLike | None = None) -> Path | None:
    """The newest ``name`` (``best.ckpt`` / ``last.ckpt``) among :func:`checkpoint_dirs` (by the checkpoint's
    write time: the latest run of this recipe's root dir), or None. A link leaving its folder is ignored."""
    found = [d / name for d in checkpoint_dirs(trainer, root_dir) if (d / name).is_file() and _inside(d / name, d)]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def checkpoint_in_folder(folder: str | os.PathLike, name: str = BEST_NAME) -> Path:
    """The checkpoint a folder stands for: its ``name`` (``best.ckpt``), its ``checkpoints/<name>``, else the
    newest ``**/checkpoints/<name>`` below it (a ``default_root_dir`` such as ``runs/uclip`` holding
    ``lightning_logs/version_*/``); ``last.ckpt`` when there is no ``best.ckpt``. Links leaving their folder are
    ignored (a shared run folder must not point elsewhere)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such directory: {folder}")
    for wanted in dict.fromkeys((name, LAST_NAME)):
        direct = [p for p in (folder / wanted, folder / "checkpoints" / wanted) if p.is_file() and _inside(p, p.parent)]
        if direct:
            return direct[0]
        below = [p for p in folder.glob(f"**/checkpoints/{wanted}") if p.is_file() and _inside(p, p.parent)]
        if below:
            return max(below, key=lambda p: p.stat().st_mtime)
    raise FileNotFoundError(f"{folder} holds no {name} or {LAST_NAME} (nor checkpoints/{name} below it): "
                            "give a checkpoint file, or fit with a ModelCheckpoint first")


def resolve_ckpt_path(trainer: L.Trainer | None, ckpt_path: str | os.PathLike | None, stage: str = "test",
                      root_dir: str | os.PathLike | None = None) -> str | None:
    """What ``--ckpt_path`` names, as a file, in a fresh process.

    ``best`` / ``best.ckpt`` and ``last`` / ``last.ckpt`` (when no such file is in the working directory) are
    the newest ones of this recipe's runs (:func:`find_run_checkpoint`); a folder (a run ``lightning_logs/version_0``,
    its ``checkpoints/``, or a ``default_root_dir`` such as ``runs/uclip``) means its best checkpoint
    (:func:`checkpoint_in_folder`); a file is itself. ``fit --ckpt_path last`` with no
    checkpoint yet starts from scratch (Lightning's "set and forget" resume); anything else that names no file
    is a ``FileNotFoundError`` saying where it looked. ``trainer`` may be None (``mmalign eval``, whose own trainer
    writes elsewhere): the runs under ``root_dir`` (the recipe's ``default_root_dir``) are searched then.
    """
    if ckpt_path is None:
        return None
    value = str(ckpt_path)
    path = Path(value)
    if path.is_file():
        return value
    if path.is_dir():
        found = checkpoint_in_folder(path, LAST_NAME if stage == "fit" else BEST_NAME)  # fit resumes from the last
        rank_zero_info(f"mmalign: --ckpt_path {value} -> {found}")
        return str(found)
    if value in ("hpc", "registry") or value.startswith("registry:"):
        return value  # Lightning's own
    name = CKPT_ALIASES.get(value)
    if name is None:
        parent = path.parent
        if str(parent) not in ("", ".") and not parent.is_dir():
            raise FileNotFoundError(f"--ckpt_path {value}: no such directory: {parent}")
        raise FileNotFoundError(f"--ckpt_path {value}: no such file (or give best, last, or a run folder)")
    found = find_run_checkpoint(trainer, name, root_dir)
    if found is not None:
        rank_zero_info(f"mmalign: --ckpt_path {value} -> {found}")
        return str(found)
    if stage == "fit" and name == LAST_NAME:
        rank_zero_info(f"mmalign: --ckpt_path {value}: no {LAST_NAME} yet, training from scratch")
        return None
    where = ", ".join(str(d) for d in checkpoint_dirs(trainer, root_dir)[:4])
    raise FileNotFoundError(
        f"--ckpt_path {value}: no {name} in this recipe's checkpoint folders ({where}); fit it first with a "
        f"ModelCheckpoint (the offline recipes have one; it writes {BEST_NAME} and {LAST_NAME}), or give a checkpoint file")
