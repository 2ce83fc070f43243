"""Hub-style exports, offline: ``from_pretrained("owner/name")`` from a populated HF cache, local folders
winning over repo ids, the same safe loader on snapshots, ``save_pretrained`` and ``push_to_hub`` (HfApi mocked)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch

from mmalign.export import AlignedModel, ExportError, export_module, load
from mmalign.export.hub import EXPORT_PATTERNS, is_repo_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXTS = ["a red apple", "ein Hund"]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    from encoders import TimmImageEncoder
    from encoders.hf_text import HFTextEncoder
    from mmalign import AlignmentModule, ClipLoss, Objective, Tower
    from projectors import MLP, Linear

    torch.manual_seed(5)
    towers = {
        "image": Tower(TimmImageEncoder("tiny:timm-vit"), "image", functools.partial(MLP, num_blocks=1)),
        "text": Tower(HFTextEncoder("tiny:bert-text", pooling="mean"), "text", Linear, normalize=True),
    }
    module = AlignmentModule(towers, [Objective(ClipLoss(logit_scale=12.0), ["image", "text"])], embed_dim=8).eval()
    return export_module(module, tmp_path_factory.mktemp("exp") / "tiny", languages=["de", "en"],
                         metrics={"val/R@1": 0.25, "val/loss": 1.5}, epoch=2, global_step=9)


@pytest.fixture(scope="module")
def want(tiny_export) -> np.ndarray:
    return AlignedModel.from_pretrained(tiny_export, device="cpu").embed_text(TEXTS).numpy()


def populate_cache(cache: Path, repo_id: str, export: Path, commit: str = COMMIT) -> Path:
    """The hub cache layout huggingface_hub writes: blobs by content hash, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(p for p in export.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        link = snap / f.relative_to(export)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, tiny_export) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return populate_cache(tmp_path / "hf" / "hub", "owner/name", tiny_export)


def test_repo_id_loads_from_the_offline_cache(offline_cache, want, tiny_export, tmp_path, capsys):
    model = AlignedModel.from_pretrained("owner/name", device="cpu")  # HF_HOME and HF_HUB_OFFLINE from the env
    np.testing.assert_allclose(model.embed_text(TEXTS).numpy(), want, atol=1e-6)
    assert model.source == f"owner/name@{COMMIT[:12]}"
    assert isinstance(load("owner/name", device="cpu"), AlignedModel)  # mmalign.load resolves repos too
    assert list(offline_cache.parent.parent.joinpath("blobs").iterdir())  # read from the cache, nothing copied in
    from mmalign.cli import main

    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n")
    main(["embed", "--model", "owner/name", "--input", str(tmp_path / "t.txt"), "--output", str(tmp_path / "e.npy"),
          "--progress", "false"])
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), want, atol=1e-6)


def test_local_directory_wins_and_missing_things_are_named(offline_cache, tiny_export, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_export, tmp_path / "owner" / "name")
    (tmp_path / "owner" / "name" / "model.safetensors").write_bytes(b"not the hub's weights")
    with pytest.raises(ExportError, match="safetensors"):  # the local folder was read (and its damage found)
        AlignedModel.from_pretrained("owner/name", device="cpu")
    assert not is_repo_id("owner/name") and is_repo_id("someone/else") and not is_repo_id("./a/b")
    with pytest.raises(ExportError, match=r"no such directory: nothing/here/at_all"):
        AlignedModel.from_pretrained("nothing/here/at_all")
    with pytest.raises(ExportError, match=r"no such directory: .*missing"):
        AlignedModel.from_pretrained(tmp_path / "missing")  # a Path is always local
    with pytest.raises(ExportError, match=r"'owner/other' is not a local directory.*not in the local cache .*HF_HUB_OFFLINE"):
        AlignedModel.from_pretrained("owner/other")
    with pytest.raises(ExportError, match="is a file, not an export directory; give its folder"):
        AlignedModel.from_pretrained(str(tiny_export / "config.json"))


def test_snapshot_goes_through_the_same_safe_loader(offline_cache, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    cfg = offline_cache / "config.json"
    config = json.loads(cfg.read_text())
    cfg.unlink()
    cfg.symlink_to(outside)  # a snapshot file pointing out of the repo's cache folder
    with pytest.raises(ExportError, match=r"config.json resolves to .*elsewhere.json, outside the repo's cache folder"):
        AlignedModel.from_pretrained("owner/name")
    cfg.unlink()
    config["weights"]["sha256"] = "0" * 64  # a tampered config in the cache: the checksum check still runs
    blob = offline_cache.parent.parent / "blobs" / "edited"
    blob.write_text(json.dumps(config))
    cfg.symlink_to(os.path.relpath(blob, cfg.parent))
    with pytest.raises(ExportError, match=r"sha256.*<hub owner/name@0123456789ab>|<hub owner/name@0123456789ab>.*sha256"):
        AlignedModel.from_pretrained("owner/name")


def test_online_download_asks_only_for_the_export_files(tiny_export, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(populate_cache(Path(kwargs["cache_dir"]), repo_id, tiny_export))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    model = AlignedModel.from_pretrained("team/space", cache_dir=tmp_path / "c", revision="v1", device="cpu")
    (repo, kw), = calls
    assert repo == "team/space" and kw["allow_patterns"] == EXPORT_PATTERNS and kw["local_files_only"] is False
    assert kw["revision"] == "v1" and kw["cache_dir"] == str(tmp_path / "c") and len(model.towers) == 2


def test_save_pretrained_round_trip_and_model_card(tiny_export, want, tmp_path):
    model = AlignedModel.from_pretrained(tiny_export, device="cpu")
    out = model.save_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    again = AlignedModel.from_pretrained(out, device="cpu")
    np.testing.assert_allclose(again.embed_text(TEXTS).numpy(), want, atol=1e-6)
    assert again.logit_scales == model.logit_scales and again.config["provenance"] == model.config["provenance"]
    card = (out / "README.md").read_text()
    for text in ("library_name: mmalign", "- de", "| text | text | `text` | `encoders.hf_text.HFTextEncoder`",
                 "| image | image |", "ClipLoss", "| val/R@1 | 0.25 |", "epoch: `2`", "sha256"):
        assert text in card, text
    with pytest.raises(ExportError, match="loaded with towers"):
        AlignedModel.from_pretrained(tiny_export, device="cpu", towers=["text"]).save_pretrained(tmp_path / "part")


def test_push_to_hub_uploads_the_saved_export(tiny_export, want, tmp_path, monkeypatch):
    seen: dict = {}

    def create_repo(self, repo_id, **kwargs):
        seen["create"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        seen["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        shutil.copytree(folder, tmp_path / "uploaded")
        seen["upload"] = (repo_id, kwargs)
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    model = AlignedModel.from_pretrained(tiny_export, device="cpu")
    assert model.push_to_hub("me/my-space", private=True, commit_message="first") == "commit-info"
    assert seen["create"] == ("me/my-space", {"repo_type": "model", "private": True, "exist_ok": True})
    assert seen["files"] == ["README.md", "config.json", "model.safetensors"]
    assert seen["upload"][0] == "me/my-space" and seen["upload"][1]["commit_message"] == "first"
    assert "AlignedModel.from_pretrained('me/my-space')" in (tmp_path / "uploaded" / "README.md").read_text()
    pushed = AlignedModel.from_pretrained(tmp_path / "uploaded", device="cpu")  # what was uploaded loads
    np.testing.assert_allclose(pushed.embed_text(TEXTS).numpy(), want, atol=1e-6)
