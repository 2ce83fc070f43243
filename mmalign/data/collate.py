"""Collation of manifest rows into tower inputs."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from mmalign.data.manifest import META_FIELDS


class TowerCollator:
    """Collate manifest rows into ``{"meta", "keys", "inputs"}``: each tower's encoder preprocesses
    the field it reads (runs in DataLoader workers, so decoding and resampling stay off the main process).

    Args:
        towers: ``{tower_name: (field, preprocess)}``.
    """

    def __init__(self, towers: dict[str, tuple[str, Callable[[Sequence[Any]], dict]]]) -> None:
        self.towers = towers

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        meta = {k: [r[k] for r in rows] for k in META_FIELDS}
        fields = sorted({field for field, _ in self.towers.values()})
        keys = {f: [str(r[f]) for r in rows] for f in fields}
        inputs = {}
        for name, (field, preprocess) in self.towers.items():
            try:
                inputs[name] = preprocess([r[field] for r in rows])
            except Exception as e:  # name the items: a bare traceback from a worker says nothing useful
                raise type(e)(f"tower {name!r} could not preprocess field {field!r} of items {meta['id']}: {e}") from e
        return {"meta": meta, "keys": keys, "inputs": inputs}


def tower_fields(module: Any) -> dict[str, tuple[str, Callable]]:
    return {name: (t.field, t.encoder.preprocess) for name, t in module.towers.items()}
