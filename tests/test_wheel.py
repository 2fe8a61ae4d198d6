"""A normal install: the wheel (not the editable checkout) carries the code and the presets, and
``effdense demo classification`` runs from an empty directory with it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _packages_in_tree() -> set[str]:
    found = set()
    for top in ("backbones", "heads", "tasks"):
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    return found


def test_the_package_list_is_every_package_in_the_tree():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed - {"tasks.presets"} == _packages_in_tree()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")  # build from a copy: the checkout gets no build/ or egg-info
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("backbones", "heads", "tasks", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    (path,) = out.glob("effdense-*.whl")
    return path


def test_the_wheel_holds_every_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in (ROOT / "configs").rglob("*.yaml"):
        assert f"tasks/presets/{preset.relative_to(ROOT / 'configs').as_posix()}" in names


def test_demo_runs_from_an_empty_directory_with_the_installed_wheel(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    # The test venv's packages (torch, ...) underneath, without running its .pth files: the editable
    # checkout's import hook is one of them, and the wheel must stand on its own.
    purelib = Path(subprocess.run([str(bindir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bindir / "python"), "install", "-q", "--no-deps",
                    str(wheel)], check=True, capture_output=True, text=True)
    work = tmp_path / "empty"
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": ""}
    where = subprocess.run([str(bindir / "python"), "-c", "import tasks; print(tasks.__file__)"], cwd=work, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert str(purelib) in where, where  # the installed copy, not the checkout
    done = subprocess.run([str(bindir / "effdense"), "demo", "classification", "--set", "train.epochs=1",
                           "--set", "train.max_steps=3", "--set", "train.progress=false", "--set", "data.workers=0"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "top1" in done.stdout.strip().splitlines()[-1]
    assert (work / "runs" / "demo-data" / "classification").is_dir()
    shown = subprocess.run([str(bindir / "effdense"), "configs", "show", "detection/efficientdet_d0_coco"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert shown == (ROOT / "configs" / "detection" / "efficientdet_d0_coco.yaml").read_text()
