"""Nothing of the lab outlives its user: not when the body raises, not on Ctrl-C or SIGTERM,
not when `up` is refused because a lab already exists."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tools.netlab.lab import REPO_ROOT, Lab, LabBusy, lab_namespaces, namespace_pids
from tools.netlab.scenarios import builtin

BuildLab = Callable[..., Lab]

pytestmark = pytest.mark.nat


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_lab_is_torn_down_when_the_body_raises(netlab_host: None) -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), Lab(builtin("two-cones-lossy")) as lab:
        assert len(lab_namespaces()) == len(lab.scenario.namespaces)
        pids = [p for ns in lab_namespaces() for p in namespace_pids(ns)]
        assert pids  # the two impairers
        raise RuntimeError("boom")
    assert lab_namespaces() == []
    assert not any(_alive(p) for p in pids)


def test_up_refuses_a_second_lab_and_leaves_the_first_alone(netlab: BuildLab) -> None:
    first = netlab("two-cones", probes=False)
    before = lab_namespaces()
    with pytest.raises(LabBusy):
        Lab(builtin("all")).up()  # shares vnl-wan, vnl-probe1, vnl-probe2 with two-cones
    assert lab_namespaces() == before
    assert first.is_up


# Loads the real fixtures from tests/nat/conftest.py by path (a site-packages `tests` package
# may shadow ours, so it is not imported by name).
INNER_CONFTEST = """
    import importlib.util
    spec = importlib.util.spec_from_file_location("netlab_conftest", {path!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    netlab_host = module.netlab_host
    netlab = module.netlab
"""

INNER_TEST = """
    import json, os, signal, time
    from tools.netlab.lab import lab_namespaces, namespace_pids

    def test_inner(netlab):
        lab = netlab("two-cones")  # with the probe servers running
        pids = [p for ns in lab_namespaces() for p in namespace_pids(ns)]
        with open(os.environ["PIDS_FILE"], "w") as f:
            json.dump(pids, f)
        how = os.environ["HOW"]
        if how == "raise":
            raise RuntimeError("the test body failed")
        os.kill(os.getpid(), getattr(signal, how))
        time.sleep(10)
"""


@pytest.mark.parametrize(("how", "exit_code"), [("raise", 1), ("SIGINT", 2), ("SIGTERM", 2)])
def test_fixture_tears_down_on_failure_and_interrupt(
    netlab_host: None, tmp_path: Path, how: str, exit_code: int
) -> None:
    conftest = Path(__file__).with_name("conftest.py")
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(INNER_CONFTEST).format(path=str(conftest))
    )
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TEST))
    pids_file = tmp_path / "pids.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-o", "addopts=", "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=REPO_ROOT, env={**os.environ, "PIDS_FILE": str(pids_file), "HOW": how},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == exit_code, done.stdout + done.stderr
    pids = json.loads(pids_file.read_text())
    assert len(pids) == 2  # the probe servers
    assert lab_namespaces() == []
    assert not any(_alive(p) for p in pids)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_selfcheck_leaves_nothing(netlab_host: None, sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.netlab", "selfcheck"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = ""
        deadline = time.monotonic() + 20
        while not line.startswith("Running") and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, "selfcheck ended early"
        time.sleep(0.5)  # the probes are running now
        pids = [p for ns in lab_namespaces() for p in namespace_pids(ns)]
        assert pids
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err
    assert "Traceback" not in err
    assert lab_namespaces() == []
    assert not any(_alive(p) for p in pids)
