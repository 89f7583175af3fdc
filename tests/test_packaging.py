"""The recipes ship inside the wheel: a user who installs the package without the source checkout can list them
and run them by name from any directory."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("masksub_lightning-*.whl")
    return path


def test_the_wheel_holds_every_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = ROOT / "masksub_lightning" / "configs"  # ./configs in the checkout links here
    in_checkout = {p.relative_to(configs).as_posix() for p in configs.rglob("*.yaml")}
    assert len(in_checkout) > 60
    assert {f"masksub_lightning/configs/{rel}" for rel in in_checkout} <= names
    assert "masksub_lightning/configs/README.md" in names


def _venv_seeing_this_interpreters_packages(env_dir: Path) -> Path:
    """A new venv whose only own package will be the wheel, and which imports the dependencies (torch, lightning,
    ...) from the interpreter running the tests, whatever that is (a base Python, a virtualenv, a conda env).

    ``system_site_packages=True`` would see the *base* interpreter's site-packages, not a virtualenv's. Instead a
    ``.pth`` file lists this interpreter's site directories. Their own ``.pth`` files are not processed (only
    directories given to ``site.addsitedir`` are scanned), so an editable install of this checkout stays out,
    and the venv's own site-packages comes first on ``sys.path``: the wheel's copy wins.
    """
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (Path(own) / "_test_dependencies.pth").write_text("\n".join(d for d in ours if Path(d).is_dir()) + "\n")
    return python


def test_installed_wheel_lists_and_runs_recipes_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    python = _venv_seeing_this_interpreters_packages(env_dir)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(env_dir / "bin" / "masksub"), *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    where = subprocess.run(
        [
            str(python),
            "-c",
            "import masksub_lightning, lightning; print(masksub_lightning.__file__, lightning.__file__)",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    import lightning

    assert where[0].startswith(str(env_dir)), where  # the wheel's copy, not the checkout
    assert where[1] == lightning.__file__  # the dependencies of the interpreter running the tests

    listed = run("recipes")
    assert listed.returncode == 0, listed.stderr
    from masksub_lightning.commands.recipes import PACKAGED_CONFIGS, find_recipes

    count = len(find_recipes(PACKAGED_CONFIGS))  # the checkout's recipes: the wheel must list the same number
    assert "deit3/vit_base_400ep.yaml" in listed.stdout and f"{count} recipe(s)" in listed.stdout
    assert str(env_dir) in listed.stdout  # read from the installed package

    fit = run(
        "fit",
        "--config",
        "quickstart",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=2",
        f"--trainer.default_root_dir={work}",
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "final val_acc1=" in fit.stdout

    missing = run("fit", "--config", "recipe:deit3/vit_bse_400ep")
    assert missing.returncode == 2 and "no recipe 'recipe:deit3/vit_bse_400ep'" in missing.stderr
