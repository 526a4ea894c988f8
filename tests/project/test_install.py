"""The package installs from its wheel: every subpackage ships, and a `--dry-run` of the demo runs from a folder
outside the repository through the installed package alone (not the checkout, not an editable install)."""

import os
import shutil
import subprocess
import sys
import zipfile

from train_utils import REPO

SKIP = shutil.ignore_patterns(".git", "data_cache", "work_dirs", "__pycache__", "*.egg-info", "build", "dist")


def _packages_on_disk():
    return sorted(
        os.path.relpath(folder, REPO).replace(os.sep, "/")
        for folder, dirs, files in os.walk(os.path.join(REPO, "internlm"))
        if "__pycache__" not in folder and any(name.endswith(".py") for name in files)
    )


def test_every_package_folder_is_a_package():
    missing = [p for p in _packages_on_disk() if not os.path.isfile(os.path.join(REPO, p, "__init__.py"))]
    assert missing == [], f"folders without __init__.py are left out of the wheel: {missing}"


def test_wheel_installs_and_dry_runs_outside_the_repository(tmp_path):
    source = tmp_path / "src"  # build from a copy: the build writes build/ and *.egg-info next to setup.py
    shutil.copytree(REPO, source, ignore=SKIP)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("*.whl")
    shipped = {os.path.dirname(name) for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    assert set(_packages_on_disk()) <= shipped, sorted(set(_packages_on_disk()) - shipped)

    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    where = subprocess.run(
        [sys.executable, "-c", "import internlm.train.cli, internlm; print(internlm.__file__)"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(target)), where.stdout
    configs = source / "configs" / "demo"
    dry_run = subprocess.run(
        [
            sys.executable,
            str(target / "bin" / "train.py"),
            "--config",
            str(configs / "phase1.py"),
            str(configs / "phase2.py"),
            "--dry-run",
        ],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dry_run.returncode == 0, dry_run.stdout + dry_run.stderr
    out = dry_run.stdout
    assert "phase 1 'phase1'" in out and "phase 2 'phase2'" in out and "memory per device" in out, out
    assert not (outside / "work_dirs").exists() and not (outside / "data_cache").exists()  # a dry run writes nothing
