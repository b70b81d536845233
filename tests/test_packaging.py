"""Installed, cardq is one import name: a wheel built from this checkout adds `cardq` and its dist-info to
site-packages and nothing else, and `cardq demo` runs from that install (its example items are package data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_config_toml_is_a_real_file_equal_to_the_built_in_defaults():
    # A symlink would let an editor that follows it change the defaults every install ships.
    config = ROOT / "config.toml"
    assert not config.is_symlink()
    assert config.read_bytes() == (ROOT / "cardq" / "default_config.toml").read_bytes(), (
        "config.toml and cardq/default_config.toml differ: edit both (the first is what a checkout runs, the "
        "second what `cardq init` writes)")


def _tracked_copy(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked, or new and not ignored), copied so that nothing built
    here lands in the repository."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src, dst = ROOT / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree, not yet committed
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


def _site_packages(env_dir: Path) -> Path:
    return next((env_dir / "lib").glob("python*/site-packages"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_installs_one_import_name_and_runs_the_demo(tmp_path: Path):
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the checkout's files")
    src = _tracked_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    # Offline: the test environment has setuptools (the [test] extra), so no build isolation is needed.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist), str(src)], check=True, capture_output=True, timeout=240)
    wheel = next(dist.glob("cardq-*.whl"))

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site = _site_packages(env_dir)
    before = set(os.listdir(site))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install",
                    "--no-deps", "-q", str(wheel)], check=True, capture_output=True, timeout=120)
    added = set(os.listdir(site)) - before
    assert {n for n in added if not n.endswith(".dist-info")} == {"cardq"}, added
    assert len([n for n in added if n.endswith(".dist-info")]) == 1, added
    assert {"store", "actors", "cli", "cli.py"}.isdisjoint(os.listdir(site))
    assert (site / "cardq" / "store" / "db.py").is_file()
    assert (site / "cardq" / "cli.py").is_file() and not (site / "cardq" / "cli.py").is_symlink()
    assert {"index.html", "page.js", "page.css"} <= set(os.listdir(site / "cardq" / "web" / "static"))  # the page

    # The dependencies come from this test run's environment, added to the new venv's path (after its own
    # site-packages, so `cardq` is the wheel's): a fresh download of apsw & co. would make the test slow.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "test-deps.pth").write_text("\n".join(deps) + "\n")
    run_dir = tmp_path / "elsewhere"  # not the checkout: nothing there to import by accident
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CARDQ_CONFIG")}
    where = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import cardq; print(cardq.__file__)"],
                           cwd=run_dir, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    demo = subprocess.run([str(env_dir / "bin" / "cardq"), "demo"], cwd=run_dir, env=env, capture_output=True,
                          text=True, timeout=180)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "REJECTED" in demo.stdout and "a few generated cards" in demo.stdout
