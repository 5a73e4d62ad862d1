"""The lab fixture skips, with the reason, where the lab cannot run (no root needed to test)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools.netlab import lab as lab_module
from tools.netlab.lab import REPO_ROOT, preflight

# Pretends to be another machine, then loads the real fixtures from tests/nat/conftest.py by
# path (a site-packages `tests` package may shadow ours, so it is not imported by name).
INNER_CONFTEST = """
    import importlib.util, os, shutil
    {patch}
    spec = importlib.util.spec_from_file_location("netlab_conftest", {path!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    netlab_host = module.netlab_host
    netlab = module.netlab
"""

NO_IPTABLES = "w = shutil.which; shutil.which = lambda t: None if t == 'iptables-nft' else w(t)"

INNER_TEST = """
    def test_inner(netlab):
        netlab("two-cones")
        raise AssertionError("the lab fixture should have skipped")
"""


def test_preflight_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert preflight() == ["the NAT lab needs root (network namespaces, iptables)"]
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(lab_module.shutil, "which", lambda tool: None if tool == "nft" else tool)
    (problem,) = preflight()
    assert problem.startswith("missing tools: nft (apt-get install")


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ("os.geteuid = lambda: 1000", "NAT lab unavailable: the NAT lab needs root"),
        (NO_IPTABLES, "NAT lab unavailable: missing tools: iptables-nft"),
    ],
    ids=["not-root", "no-iptables"],
)
def test_fixture_skips_with_the_reason(tmp_path: Path, patch: str, reason: str) -> None:
    if patch == NO_IPTABLES and os.geteuid() != 0:
        pytest.skip("the missing-tool path is reached only as root")
    conftest = Path(__file__).with_name("conftest.py")
    text = textwrap.dedent(INNER_CONFTEST).format(patch=patch, path=str(conftest))
    (tmp_path / "conftest.py").write_text(text)
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TEST))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o", "addopts=",
         "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout
    assert reason in done.stdout
