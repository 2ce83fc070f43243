"""Hub-style exports: load ``"owner/name"`` through ``huggingface_hub``, save and push an export with a model card.

    model = AlignedModel.from_pretrained("owner/name")          # the local HF cache offline, a download online
    model.save_pretrained("exports/copy")                       # config.json + model.safetensors + README.md
    model.push_to_hub("me/my-space", private=True)              # HfApi.create_repo + upload_folder

**Which is meant, a folder or a repo?** An existing local directory always wins (``exports/lit`` is read
from disk even though it looks like ``owner/name``); an existing file is an error; a ``str`` that is not a
path on disk but a valid repo id (``owner/name``, no leading ``.``/``/``, no trailing slash) goes to the
hub; anything else is "no such directory". ``pathlib.Path`` objects are always local.

**Same safe loader.** Only the files of an export are downloaded (``allow_patterns``). The hub cache stores
them as symlinks into ``models--owner--name/blobs/``, which the export loader's path confinement (rightly)
refuses, so the snapshot is first checked (every file must resolve inside the repo's own cache folder) and
its export files are hard-linked (or copied: exports are small) into a private temporary folder; that plain
folder is then read by exactly the loader used for local exports (strict JSON, class allowlist, confined
paths, shapes before allocation, sha256, NaN/Inf refused).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from mmalign.export.format import CONFIG_NAME, ONNX_DIR, WEIGHTS_NAME, ExportError

#: The files of an export (both kinds) and its model card: all that is downloaded from a repo.
EXPORT_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, f"{ONNX_DIR}/*.onnx", "README.md"]
MODEL_CARD = "README.md"
MAX_CARD_METRICS = 40
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_repo_id(name: Any) -> bool:
    """True for a ``str`` shaped like a hub model repo id (``owner/name``) that is no path on disk."""
    if not isinstance(name, str) or not _REPO_ID.match(name) or ".." in name or "--" in name or name.endswith((".git", ".")):
        return False
    return not Path(name).exists()


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_cache_dir() -> Path:
    """The hub cache as the environment says now: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshot(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
             local_files_only: bool | None = None, token: str | bool | None = None) -> Path:
    """The cached snapshot folder of ``repo_id`` with the export's files (downloaded if needed and allowed).

    Args:
        repo_id: ``owner/name`` of a model repo.
        revision: Branch, tag or commit (default ``main``).
        cache_dir: Hub cache (default: :func:`hub_cache_dir`).
        local_files_only: Never download (default: when ``HF_HUB_OFFLINE`` is set).
        token: Hub token for private repos (default: the saved login).

    Raises:
        ExportError: Offline and not cached, no such repo (or private), or the download failed.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    cache = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
    offline = _offline() if local_files_only is None else local_files_only
    where = f"{repo_id!r} is not a local directory, and the Hugging Face Hub model repo {repo_id!r}"
    rev = f" (revision {revision!r})" if revision else ""
    try:
        path = snapshot_download(repo_id, repo_type="model", revision=revision, cache_dir=str(cache),
                                 local_files_only=offline, allow_patterns=EXPORT_PATTERNS, token=token,
                                 library_name="mmalign")
    except (LocalEntryNotFoundError, FileNotFoundError) as err:
        how = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise ExportError(f"{where}{rev} is not in the local cache {cache} and {how}; download it once online "
                          f"(`hf download {repo_id}`) or give the path of an export directory") from err
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise ExportError(f"{where} does not exist or is private/gated (pass token=... or log in)") from err
    except RevisionNotFoundError as err:
        raise ExportError(f"{where} has no revision {revision!r}") from err
    except HfHubHTTPError as err:
        raise ExportError(f"{where}{rev}: download failed: {err}") from err
    return Path(path)


def _export_files(root: Path) -> list[str]:
    """Relative POSIX paths of the files under ``root`` that :data:`EXPORT_PATTERNS` admit."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_dir() and any(fnmatch.fnmatchcase(rel, pat) for pat in EXPORT_PATTERNS):
            out.append(rel)
    return out


@contextlib.contextmanager
def plain_copy(snapshot_dir: Path) -> Iterator[Path]:
    """A private folder holding the export files of a hub snapshot as plain files (hard links or copies).

    Every file must resolve inside the repo's own cache folder (``models--owner--name``: its ``snapshots/``
    and ``blobs/``); a symlink pointing elsewhere is refused. The folder is removed on exit.
    """
    repo_folder = snapshot_dir.parent.parent.resolve() if snapshot_dir.parent.name == "snapshots" else snapshot_dir.resolve()
    files = _export_files(snapshot_dir)
    if CONFIG_NAME not in files:
        raise ExportError(f"{snapshot_dir} (a hub snapshot) holds no {CONFIG_NAME}: the repo is not an mmalign export")
    with tempfile.TemporaryDirectory(prefix="mmalign-hub-") as tmp:
        for rel in files:
            real = (snapshot_dir / rel).resolve()
            if not real.is_relative_to(repo_folder) or not real.is_file():
                raise ExportError(f"hub snapshot {snapshot_dir}: {rel} resolves to {real}, outside the repo's cache "
                                  f"folder {repo_folder}")
            target = Path(tmp) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(real, target)
            except OSError:  # another file system, or links not allowed: exports are small, copy
                shutil.copyfile(real, target)
        yield Path(tmp)


@contextlib.contextmanager
def resolve_export(path: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                   local_files_only: bool | None = None, token: str | bool | None = None) -> Iterator[tuple[Path, str]]:
    """``(folder to load, source label)`` for an export directory or a hub repo id (see the module docstring).

    Raises:
        ExportError: ``path`` is a file, or neither a directory nor a repo id ("no such directory"), or the
            repo cannot be had (see :func:`snapshot`).
    """
    p = Path(path)
    if p.is_dir():
        if revision is not None:
            raise ExportError(f"revision={revision!r} is for hub repos; {p} is a local directory")
        yield p, str(p)
        return
    if p.exists():
        hint = f"; give its folder {str(p.parent)!r}" if p.name == CONFIG_NAME else ""
        raise ExportError(f"{p} is a file, not an export directory{hint}")
    if not is_repo_id(path):
        raise ExportError(f"no such directory: {p} (an export directory, or a hub repo id like 'owner/name')")
    snap = snapshot(str(path), revision, cache_dir, local_files_only, token)
    label = f"{path}@{snap.name[:12]}"
    with plain_copy(snap) as root:
        try:
            yield root, label
        except ExportError as err:  # name the repo, not the temporary folder
            raise ExportError(str(err).replace(str(root), f"<hub {label}>")) from err


# -- saving and pushing ------------------------------------------------------------------------

def model_card(config: Mapping[str, Any], repo_id: str | None = None) -> str:
    """A hub model card (``README.md``) for an export: metadata, towers, objectives, provenance, metrics."""
    from huggingface_hub import ModelCard, ModelCardData

    langs = config.get("languages") or None
    prov = config.get("provenance") or {}
    data = ModelCardData(library_name="mmalign", language=langs, tags=["mmalign", "multimodal", "embeddings",
                                                                       "frozen-encoders"])
    title = repo_id or "mmalign export"
    lines = [f"# {title}", "",
             "Small trained projectors that map frozen pretrained encoders into one shared embedding space, "
             "made with mmalign. The frozen encoders are not in this repo: they are "
             "rebuilt from `config.json` (and must equal the recorded `cache_key`).", "",
             "```python", "from mmalign import AlignedModel", "",
             f"model = AlignedModel.from_pretrained({(repo_id or 'path/to/export')!r})", "print(model.describe())",
             "```", "", f"## Towers ({config.get('embed_dim')}-d shared space)", "",
             "| tower | modality | field | encoder | encoder args | projector | parameters | normalised | centred |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, t in (config.get("towers") or {}).items():
        enc, proj = t.get("encoder", {}), t.get("projector", {})
        args = ", ".join(f"{k}={v}" for k, v in (enc.get("init_args") or {}).items())
        params = proj.get("num_parameters")
        lines.append(f"| {name} | {t.get('modality')} | `{t.get('field')}` | `{enc.get('class_path')}` "
                     f"({enc.get('output_dim')}-d) | {args or '-'} | `{str(proj.get('class_path', '')).rsplit('.', 1)[-1]}` "
                     f"| {f'{params:,}' if isinstance(params, int) else '?'} | {t.get('normalize')} | {bool(t.get('center'))} |")
    objectives = config.get("objectives") or []
    if objectives:
        lines += ["", "## Objectives", ""]
        for o in objectives:
            loss = o.get("loss", {})
            scale = f", learned logit scale {loss['logit_scale']:.3g}" if isinstance(loss.get("logit_scale"), (int, float)) else ""
            lines.append(f"- {' <-> '.join(o.get('towers', []))}: `{str(loss.get('class_path', '')).rsplit('.', 1)[-1]}` "
                         f"(weight {o.get('weight')}{scale})")
    lines += ["", "## Provenance", "",
              f"- languages seen in training: {', '.join(langs) if langs else 'not recorded'}"]
    for key in ("mmalign_version", "torch_version", "created", "checkpoint", "epoch", "global_step"):
        if prov.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: `{prov[key]}`")
    weights = config.get("weights") or {}
    if weights.get("sha256"):
        lines.append(f"- `{weights.get('file')}` sha256 `{weights['sha256']}` ({weights.get('num_parameters', '?')} parameters)")
    from mmalign.evaluation.compare import flatten

    metrics = flatten(prov.get("metrics") or {})  # nested test results -> "test/image|text/de/image->text/R@1"
    if metrics:
        headline = [k for k in sorted(metrics) if re.search(r"(R@1|loss|acc\w*)$", k)] or sorted(metrics)
        shown = headline[:MAX_CARD_METRICS]
        more = len(metrics) - len(shown)
        lines += ["", "## Metrics (as recorded in config.json's provenance at export)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k.replace('|', chr(92) + '|')} | {metrics[k]:.4g} |" for k in shown]  # a | would split the cell
        if more:
            lines += ["", f"{more} more (MRR, R@5/R@10, ranks, query counts...) in `config.json` -> `provenance.metrics`."]
    lines += ["", "Loading treats this repo as untrusted: strict JSON, only mmalign's own encoder/projector classes, "
              "paths confined to the export, shapes checked before allocation, sha256 verified (docs/security.md).", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                commit_message: str | None = None, revision: str | None = None, create_pr: bool = False) -> Any:
    """Upload an export folder to ``repo_id`` (created if missing) with ``HfApi``; returns the ``CommitInfo``."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                             commit_message=commit_message or "Upload mmalign export", revision=revision,
                             create_pr=create_pr, allow_patterns=EXPORT_PATTERNS)


def save_aligned(model: Any, output: str | os.PathLike, *, card: bool = True, repo_id: str | None = None) -> Path:
    """Write an :class:`~mmalign.export.model.AlignedModel` as an export directory with the export writer
    (atomic; ``config.json`` + ``model.safetensors`` [+ ``README.md``]). See ``AlignedModel.save_pretrained``."""
    import copy

    import torch

    from mmalign.export.format import MEAN_KEY, atomic_directory, write_json
    from mmalign.export.weights import write_weights

    recorded = model.config.get("towers") or {}
    if set(model.towers) != set(recorded):
        raise ExportError(f"this model was loaded with towers {sorted(model.towers)} of {sorted(recorded)}; "
                          "save_pretrained writes whole exports: load it without towers=...")
    config = copy.deepcopy(model.config)
    listed = (config.pop("weights", None) or {}).get("tensors") or {}
    config.pop("onnx", None)  # graphs of the exported projectors, not rewritten here
    state = {f"towers.{n}.projector.{k}": v for n, t in model.towers.items() for k, v in t.projector.state_dict().items()}
    state.update({f"towers.{n}.{MEAN_KEY}": t.embedding_mean for n, t in model.towers.items() if t.center})
    state.update(model._extra_tensors)
    dtypes = {k: getattr(torch, str(v.get("dtype"))) for k, v in listed.items()
              if isinstance(v, dict) and isinstance(getattr(torch, str(v.get("dtype")), None), torch.dtype)}
    state = {k: v.detach().to("cpu", dtypes.get(k, v.dtype)).contiguous().clone() for k, v in state.items()}
    with atomic_directory(output) as tmp:
        config["weights"] = write_weights(state, tmp, f"the model loaded from {model.source}")
        write_json(tmp / CONFIG_NAME, config)
        if card:
            (tmp / MODEL_CARD).write_text(model_card(config, repo_id), encoding="utf-8")
    return Path(output)
