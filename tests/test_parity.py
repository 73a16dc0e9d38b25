"""Refactor guard: the tiny workflow's result tables equal those of a reference revision.

Opt-in (two workflow runs): STAGELENS_PARITY_REF=<git revision> pytest tests/test_parity.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REF = os.environ.get("STAGELENS_PARITY_REF")


@pytest.mark.slow
@pytest.mark.skipif(not REF, reason="set STAGELENS_PARITY_REF=<git revision> to compare with that revision")
def test_tables_identical_to_the_reference_revision(tmp_path):
    script = Path(__file__).with_name("parity_check.py")
    done = subprocess.run([sys.executable, str(script), REF, "--workdir", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "identical" in done.stdout
