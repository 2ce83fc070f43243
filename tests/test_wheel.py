"""The recipes ship as package data: a wheel built from the work tree holds every YAML as a real file, and a
fresh venv that installs it (or installs the work tree editable) resolves and parses the quickstart's recipe
from a folder outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mmalign.cli.quickstart import RECIPE

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
#: The quickstart's recipe name (``offline/anchor_bind`` -> ``anchor_bind``).
QUICKSTART = RECIPE.split("/")[-1]

# Run in the fresh venv from outside the repository: where mmalign comes from, and the quickstart's recipe.
PROBE = """
import json, warnings
import encoders, mmalign
from mmalign.cli.quickstart import RECIPE
from mmalign.recipe import list_recipes, load_config, recipe_files

files = recipe_files(RECIPE)
config = load_config(RECIPE)
print(json.dumps({
    "mmalign": mmalign.__file__, "encoders": encoders.__file__, "files": [str(f) for f in files],
    "recipes": list_recipes(),
    "anchor": config["model"]["init_args"]["towers"]["text"]["init_args"]["encoder"]["class_path"],
    "epochs": config["trainer"]["max_epochs"],
}))
"""


def _work_tree(dst: Path) -> Path:
    """The work tree as git sees it (tracked and untracked files, not ignored ones; links kept as links), copied,
    so that the build's ``build/`` and ``*.egg-info`` never land in the checkout."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, (os.fsdecode(n) for n in listed.split(b"\0"))):
        src, target = ROOT / name, dst / name
        if not (src.is_file() or src.is_symlink()):
            continue  # deleted in the work tree, not yet in the index
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)
    assert (dst / "mmalign" / "recipes").is_symlink()
    return dst


def _venv(path: Path) -> Path:
    # --system-site-packages: torch, lightning... come from this environment; pip too (the venv has none).
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


def _pip_install(python: Path, *args: str) -> None:
    # --ignore-installed: install into the venv even though this environment already has mmalign (editable).
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _clean_env() -> dict:
    """The environment without PYTHONPATH: the fresh venv must find mmalign where it was installed."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _probe(python: Path, cwd: Path) -> dict:
    proc = subprocess.run([str(python), "-c", PROBE], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _expected_files() -> set[str]:
    return {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")}


@pytest.mark.slow
def test_wheel_ships_the_recipes_and_the_quickstart_resolves_them(tmp_path):
    src = _work_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = dist.glob("mmalign-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        recipes = {i.filename.removeprefix("mmalign/recipes/"): i for i in zf.infolist() if i.filename.startswith("mmalign/recipes/")}
        assert set(recipes) == _expected_files()
        # Real files with the configs' content (a zip entry of a link would hold only its target's name).
        for name, info in recipes.items():
            assert zf.read(info) == (CONFIGS / name).read_bytes(), name

    python = _venv(tmp_path / "venv")
    _pip_install(python, str(wheel))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    got = _probe(python, outside)
    site = str(tmp_path / "venv")
    assert got["mmalign"].startswith(site) and got["encoders"].startswith(site), got
    assert [Path(f).relative_to(Path(got["mmalign"]).parent / "recipes").as_posix() for f in got["files"]] == [
        f"{QUICKSTART}.yaml", f"offline/{QUICKSTART}.yaml"]
    assert got["recipes"] == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert got["anchor"] == "encoders.UniversalSentenceEncoderM" and got["epochs"] == 40  # the offline overlay applied

    listing = subprocess.run([str(tmp_path / "venv" / "bin" / "mmalign"), "recipes"], cwd=outside, env=_clean_env(),
                             capture_output=True, text=True)
    assert listing.returncode == 0 and QUICKSTART in listing.stdout and site in listing.stdout, listing.stderr[-2000:]


@pytest.mark.slow
def test_editable_install_resolves_the_recipes_through_the_link(tmp_path):
    src = _work_tree(tmp_path / "src")
    python = _venv(tmp_path / "venv")
    _pip_install(python, "--no-build-isolation", "-e", str(src))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    got = _probe(python, outside)
    assert got["mmalign"] == str(src / "mmalign" / "__init__.py"), got
    assert got["files"] == [str(src / "configs" / f"{QUICKSTART}.yaml"), str(src / "configs" / "offline" / f"{QUICKSTART}.yaml")]
    assert got["anchor"] == "encoders.UniversalSentenceEncoderM"
