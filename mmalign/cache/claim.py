"""Writers of one split announce their settings, so that two runs with different settings cannot mix shards.

Ranks of one run (same recipe, ``--shard_size``, ``--dtype``, ``--world_size``...) share a split and
agree on every shard; two runs with *different* settings would overwrite each other's shards and
markers, and each would end finding the other's markers, print "waiting for other ranks" and exit 0
with no cache. So before its first write a writer puts a claim ``.writer-<host>-<pid>-<token>.json``
holding a digest of its settings into the split folder, and checks the claims there again before
every shard and before the merge. A live claim with other settings that is older than ours makes us
stop with a :class:`~mmalign.cache.format.CacheError` saying who holds the split and which settings
differ (the older writer goes on; if both saw each other, the newer one stops). Claims of dead
processes on this host are removed; a claim from another host is trusted until deleted by hand.
A run that finds nothing to write claims nothing (a finished cache on read-only storage stays usable).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from mmalign.cache.format import _HOST, CacheError, _alive, atomic_write_json, digest, read_json

_GLOB = ".writer-*.json"


def settings_key(settings: dict[str, Any]) -> str:
    return digest(json.dumps(settings, sort_keys=True, default=str))


def _diff(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    keys = sorted(set(theirs) | set(ours))
    parts = [f"{k}: theirs {theirs.get(k)!r}, ours {ours.get(k)!r}" for k in keys if theirs.get(k) != ours.get(k)]
    return "; ".join(parts) or "(settings differ)"


class SplitClaim:
    """This process's claim on one split folder, made lazily on the first :meth:`ensure`.

    Args:
        split_dir: ``<cache_dir>/<split>``.
        settings: Everything that decides the shards' contents and layout (JSON-able).
    """

    def __init__(self, split_dir: Path, settings: dict[str, Any]) -> None:
        self.split_dir = Path(split_dir)
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        self.key = settings_key(self.settings)
        self.path: Path | None = None
        self.time_ns = 0

    def ensure(self) -> None:
        """Claim the split (first call) and refuse to go on if an older live writer uses other settings.

        Raises:
            CacheError: Another writer with other settings holds the split; the message names it.
        """
        if self.path is None:
            self.split_dir.mkdir(parents=True, exist_ok=True)
            self.time_ns = time.time_ns()
            self.path = self.split_dir / f".writer-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
            atomic_write_json(self.path, {"host": _HOST, "pid": os.getpid(), "key": self.key, "time_ns": self.time_ns,
                                          "settings": self.settings})
        for other in sorted(self.split_dir.glob(_GLOB)):
            if other == self.path:
                continue
            info = read_json(other)
            if not isinstance(info, dict):
                continue  # unreadable: not a claim this code wrote
            if info.get("host") == _HOST and isinstance(info.get("pid"), int) and not _alive(info["pid"]):
                try:  # its writer was killed: the claim is stale
                    other.unlink(missing_ok=True)
                except OSError:
                    pass
                continue
            if info.get("key") == self.key:
                continue  # another rank of this run (or the same run started twice): same shards
            if (info.get("time_ns", 0), other.name) > (self.time_ns, self.path.name):
                continue  # a newer writer with other settings: it stops when it sees us
            self.release()
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time_ns", 0) / 1e9))
            raise CacheError(
                f"{self.split_dir} is being written by another `mmalign cache` (pid {info.get('pid')} on host "
                f"{info.get('host')}, since {since}) with other settings: {_diff(info.get('settings') or {}, self.settings)}. "
                f"Wait for it to finish, or write to another --output (if no such process is running, delete {other})"
            )

    def release(self) -> None:
        """Remove this process's claim (when it finishes, fails or stops)."""
        if self.path is not None:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
            self.path = None
