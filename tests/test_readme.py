"""The README's Python examples, run as they are written, against a real supervisor on the config `cardq init`
writes: an example that no longer works fails here."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import cardq
from cardq.actors.protocol import socket_path

from conftest import wait_for
from supervision import CARDQ, with_suppressed

README = Path(__file__).resolve().parent.parent / "README.md"


def python_examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)


def test_the_readme_has_python_examples():
    assert len(python_examples()) >= 3


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    cardq.init(root / "config.toml")
    env = {k: v for k, v in os.environ.items() if k != "CARDQ_CONFIG"}
    out = open(root / "supervise.out", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([CARDQ, "supervise"], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    loaded = cardq.connect(root / "config.toml").config
    try:
        wait_for(lambda: all(socket_path(loaded.run_dir, a, 0).exists() for a in ("counter", "ratelimit", "paths")),
                 60, what="the actors listening")
        yield root, env
    finally:
        with_suppressed(os.killpg, proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            with_suppressed(os.killpg, proc.pid, signal.SIGKILL)
            proc.wait(10)
        out.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("n", range(len(python_examples())))
def test_readme_example_runs(site, n):
    root, env = site
    code = python_examples()[n]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, f"README example {n + 1}:\n{code}\n--- stderr:\n{done.stderr[-3000:]}"
    if "q.wait(" in code:
        assert " done " in done.stdout, done.stdout  # the cards were made by the running workers
    if "LimitExceeded" in code:
        assert done.stdout.startswith("daily.free 5 0 6 "), done.stdout
    if "def handle(" in code:
        assert done.stdout.strip() == "200", done.stdout
