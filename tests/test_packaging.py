"""The distribution as a user gets it: one import name, and a non-editable install that works from
any directory (no file of the checkout on its path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.server import ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of what the distribution is made of: setuptools leaves build/ and
    # *.egg-info where it builds, and would reuse a stale build/ of the checkout.
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "mtrank", source / "mtrank", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (found,) = out.glob("mtrank-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed (not editable); its dependencies come
    from the test's own environment through a path entry, so nothing is downloaded."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python*/site-packages"))
    # Only the dependencies' directory: the test environment's own .pth files (the editable
    # install of this checkout among them) are not processed from a plain path entry.
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return venv


def _run(venv: Path, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MTRANK_") and k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env | {"PATH": f"{venv / 'bin'}:{env['PATH']}"},
                          capture_output=True, text=True, timeout=timeout)


def test_the_wheel_installs_one_top_level_package(wheel):
    names = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    dist_info = {n for n in names if n.endswith(".dist-info")}
    assert len(dist_info) == 1 and names - dist_info == {"mtrank"}, sorted(names)


def test_the_installed_package_is_the_wheel_not_the_checkout(installed, tmp_path):
    r = _run(installed, ["python", "-c", "import mtrank.service.app, mtrank.bench.harness; "
                         "print(mtrank.service.app.__file__)"], tmp_path, 120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(installed), r.stdout
    for name in ("service", "training", "export", "loadtests"):
        r = _run(installed, ["python", "-c", f"import {name}"], tmp_path, 60)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (name, r.stdout, r.stderr)


def test_demo_help_runs_from_another_directory(installed, tmp_path):
    r = _run(installed, ["mtrank", "demo", "--help"], tmp_path, 120)
    assert r.returncode == 0, r.stderr
    assert "usage: mtrank demo" in r.stdout


@pytest.mark.slow
@pytest.mark.redis
def test_bench_quick_prepare_runs_from_another_directory(installed, tmp_path, redis_url):
    r = _run(installed, ["mtrank", "bench", "--quick", "--prepare", "--repo", "bench/repo", "--model", "ple",
                         "--out", "bench/out", "--redis", redis_url], tmp_path, 900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "bench" / "repo" / "ple" / "1" / "manifest.json").is_file()
    out = tmp_path / "bench" / "out"
    assert (out / "bench.json").is_file(), sorted(p.name for p in out.iterdir())
