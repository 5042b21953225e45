"""The repository is formatted and linted by the one tool configured in pyproject.toml (ruff,
pinned in the `test` extra): `ruff format .` and `ruff check .` leave nothing to change."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff():
  exe = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
  if not os.path.exists(exe):
    pytest.fail("ruff is not installed: pip install -e '.[test]' (pyproject.toml configures it)")
  return exe


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff(command):
  done = subprocess.run([_ruff(), *command], cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, f"ruff {' '.join(command)}:\n{done.stdout}\n{done.stderr}"


def test_public_api_is_curated():
  """`panda_jax.__all__` names exactly the package's public objects (its submodules aside)."""
  import types

  import panda_jax as pj

  exported = {
    n
    for n in dir(pj)
    if not n.startswith("_")
    and not (isinstance(getattr(pj, n), types.ModuleType) and n != "generator_ops")
  }
  assert sorted(pj.__all__) == sorted(exported)
  assert len(set(pj.__all__)) == len(pj.__all__)
