"""WebDataset shards (``shards/{00000..00123}.tar``), the img2dataset layout (``key.jpg`` + ``key.txt`` + ``key.json``).

Streamed with the ``webdataset`` library's tar readers. Every epoch, the shard list (shuffled per epoch with
``shuffle: true``, the same order on every rank) is split by rank (``torch.distributed``, else ``RANK`` /
``WORLD_SIZE``), then by DataLoader worker: shard ``j`` of the epoch's order is read by rank ``j % world``,
worker ``(j // world) % workers``, so no sample is seen twice in an epoch (give at least ``world x workers``
shards, or some readers get none). Samples are yielded in shard order (no sample shuffle buffer: shuffling is
by shard), which keeps the position resumable: ``state_dict()`` (taken per worker by torchdata's
``StatefulDataLoader``, as the DataModule uses) holds the epoch, the shard reached and the samples consumed
in it, and ``load_state_dict`` resumes mid-shard by skipping those samples.

Sample -> row: ``id`` = the sample key, ``image`` = the ``jpg``/``jpeg``/``png``/``webp`` member (a PIL image),
``text`` = ``txt`` (else ``json["caption"]``), and ``lang``, ``concept``, ``text_en``, ``id`` from the ``json``
member when present (img2dataset's ``caption``/``url``/``key`` are kept under those names). ``fields:`` maps a
field to a member extension or ``json.<key>`` instead. Audio members are not decoded here (use an audio folder).

``mmalign cache`` (and training from that cache) reads shards through :meth:`WebDatasetSource.materialize`: the
image members are extracted once beside the cache (``<cache>/_media/<split>/``) and rows point at them.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mmalign.data.manifest import PATH_FIELDS, ManifestRowError
from mmalign.data.policy import ON_ERROR, BadInputError, BadInputReport, check_choice, is_known_language
from mmalign.data.sources.base import SourceError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_shards(pattern: str | Iterable[str]) -> list[str]:
    """Brace-expanded shard list (``a/{000..003}.tar`` -> 4 paths); local shards must exist."""
    from braceexpand import braceexpand

    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    shards = [s for p in patterns for s in braceexpand(str(p))]
    missing = [s for s in shards if "://" not in s and not s.startswith("pipe:") and not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} WebDataset shard(s) not found, e.g. {missing[0]}")
    if not shards:
        raise SourceError(f"{pattern}: the pattern names no shard")
    return shards


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class WebDatasetSource(IterableDataset):
    """Rows streamed from WebDataset shards (see the module docstring).

    Args:
        shards: A brace pattern or a list of shard paths/URLs.
        fields: ``{field: extension | "json.<key>"}`` overriding the default member mapping.
        lang: Language of samples whose json has no ``lang``.
        shuffle: Shuffle the shard order every epoch (with ``seed + epoch``).
        seed: Base seed of that shuffle.
        size: Number of samples, if known (``len()``; else ``len()`` raises TypeError).
        languages: Keep only samples in these languages.
        required_fields: Fields every row must have (missing/blank ones are bad input).
        on_error: ``"error"`` (default) or ``"skip"`` bad samples (undecodable image, bad json...).
    """

    def __init__(self, shards: str | list[str], fields: Mapping[str, str] | None = None, lang: str | None = None,
                 shuffle: bool = False, seed: int = 0, size: int | None = None, languages: Iterable[str] | None = None,
                 required_fields: Iterable[str] = (), on_error: str = "error") -> None:
        check_choice("on_error", on_error, ON_ERROR)
        self.pattern = shards
        self.shards = expand_shards(shards)
        self.path = Path(str(shards if isinstance(shards, str) else self.shards[0]))
        self.fields = dict(fields or {})
        self.lang, self.shuffle, self.seed, self.size = lang, shuffle, seed, size
        self.languages_filter = set(languages) if languages is not None else None
        self.required = list(required_fields)
        if "audio" in self.required and "audio" not in self.fields:
            raise SourceError(f"{self.path}: audio members of WebDataset shards are not decoded; use an audio folder source")
        self.on_error = on_error
        self.report = BadInputReport()
        self._extract: Path | None = None  # materialize(): media members written here instead of decoded
        self.epoch = -1  # incremented when an epoch's iteration starts
        self._position = (0, 0)  # (index into this reader's shards, samples consumed in that shard)
        self._resume: dict[str, int] | None = None

    def __len__(self) -> int:
        if self.size is None:
            raise TypeError(f"{self.path}: the number of samples is unknown; give `size:` in the source spec")
        return self.size

    @property
    def skipped(self) -> dict[str, int]:
        return self.report.as_dict()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch - 1

    def epoch_shards(self, epoch: int, rank: int, world: int, worker: int, workers: int) -> list[str]:
        """The shards one reader reads in ``epoch`` (disjoint across readers; their union is every shard)."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        return order[rank::world][worker::workers]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self._position[0], "offset": self._position[1]}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._resume = dict(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = _rank_world()
        start_shard, skip = 0, 0
        if self._resume is not None:  # continue the interrupted epoch where it stopped
            self.epoch, start_shard, skip = self._resume["epoch"], self._resume["shard"], self._resume["offset"]
            self._resume = None
        else:
            self.epoch += 1
        mine = self.epoch_shards(self.epoch, rank, world, worker, workers)
        for pos in range(start_shard, len(mine)):
            samples = group_by_keys(tar_file_expander(url_opener([{"url": mine[pos]}])))
            for k, sample in enumerate(samples):
                if pos == start_shard and k < skip:
                    continue
                self._position = (pos, k + 1)
                row = self._row(sample)
                if row is not None:
                    yield row
            self._position = (pos + 1, 0)

    def materialize(self, folder: str | Path) -> Any:
        """All samples (every shard, in order, whatever the rank) as a map-style source for the feature cache.

        Media members are written once to ``folder/<shard>/<key>.<ext>`` (kept: a re-run or the cached reader
        finds them) and rows point at those files, so the cache's fingerprints and bad-media policy work as
        for a manifest; only the rows' metadata is held in memory.
        """
        from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

        from mmalign.data.sources.base import ListSource

        self._extract = Path(folder)
        rows = []
        try:
            for shard in self.shards:
                for sample in group_by_keys(tar_file_expander(url_opener([{"url": shard}]))):
                    row = self._row(sample)
                    if row is not None:
                        rows.append(row)
        finally:
            self._extract = None
        if not rows:
            from mmalign.data.manifest import ManifestError

            raise ManifestError(f"{self.path}: no samples left ({self.report.summary()})")
        return ListSource.of(rows, self)

    def _write_member(self, sample: dict[str, Any], ext: str) -> str:
        url = str(sample.get("__url__") or "shard")
        folder = self._extract / Path(url.split("::")[-1]).name.split(".")[0]
        target = folder / f"{sample['__key__']}.{ext}"
        if not target.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(sample[ext])
            os.replace(tmp, target)
        return str(target)

    # -- one sample -------------------------------------------------------------------------------
    def _member(self, sample: dict[str, Any], spec: str, meta: dict[str, Any]) -> Any:
        if spec.startswith("json."):
            return meta.get(spec[5:])
        data = sample.get(spec)
        return data

    def _row(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key, url = sample.get("__key__"), sample.get("__url__")
        try:
            meta: dict[str, Any] = {}
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"])
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise BadInputError(key, "json", "malformed json", f"{url}: {e}") from e
                if not isinstance(meta, dict):
                    raise BadInputError(key, "json", "malformed json", f"{url}: the json member must be an object")
            row: dict[str, Any] = {k: meta[k] for k in ("id", "concept", "lang", "text", "text_en", "caption", "url", "key") if k in meta}
            row.setdefault("id", key)
            image = next((e for e in IMAGE_EXTS if e in sample), None)
            if image is not None:
                row["image"] = sample[image] if self._extract is None else self._write_member(sample, image)
            if "txt" in sample:
                row["text"] = sample["txt"]
            elif "caption" in meta:
                row["text"] = meta["caption"]
            for field, spec in self.fields.items():
                value = self._member(sample, spec, meta)
                if value is not None:
                    row[field] = value
            for field in list(row):
                if isinstance(row[field], bytes) and field not in PATH_FIELDS:
                    try:
                        row[field] = row[field].decode("utf-8").strip()
                    except UnicodeDecodeError as e:
                        raise BadInputError(key, field, "invalid utf-8", f"{url}: member .{field} is not UTF-8") from e
            if isinstance(row.get("image"), bytes):
                from PIL import Image

                try:
                    img = Image.open(io.BytesIO(row["image"]))
                    img.load()
                except Exception as e:  # noqa: BLE001 - any decoding failure is this sample's problem
                    raise BadInputError(key, "image", "bad image", f"{url}: {e}") from e
                row["image"] = img
            row["id"], row["concept"] = str(row["id"]), str(row.get("concept") or row["id"])
            row["lang"] = str(row.get("lang") or self.lang or "und")
            if not is_known_language(row["lang"]):
                raise BadInputError(key, "lang", "unknown language", f"{url}: {row['lang']!r}")
            if self.languages_filter is not None and row["lang"] not in self.languages_filter:
                return None
            for field in self.required:
                value = row.get(field)
                if value is None:
                    raise BadInputError(key, field, f"missing {field}", f"{url}: sample has no member for {field!r}")
                if isinstance(value, str) and not value.strip():
                    raise BadInputError(key, field, "empty text", f"{url}: {value!r}")
            return row
        except (BadInputError, ManifestRowError) as e:
            self.report.handle(e, self.on_error)
            return None
