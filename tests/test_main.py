"""`python -m dfjax …` is the same command as `dfjax …` (the console script pyproject.toml declares)."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _console_script() -> str:
  """Python code calling what `[project.scripts] dfjax` names, as the installed script does."""
  target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["dfjax"]
  module, function = target.split(":")
  return f"import sys; from {module} import {function}; sys.exit({function}())"


def _run(*argv: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("case", ["help", "bad input"])
def test_python_m_dfjax_is_the_dfjax_command(case, tmp_path):
  args = (["--help"] if case == "help" else ["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
  script, module = _run("-c", _console_script(), *args), _run("-m", "dfjax", *args)
  same = (module.returncode, module.stdout, module.stderr) == (script.returncode, script.stdout, script.stderr)
  assert same, (module, script)
  if case == "help":
    assert module.returncode == 0 and module.stdout.startswith("usage: dfjax ")
    assert all(command in module.stdout for command in ("convert", "generate", "bench", "train"))
  else:
    assert module.returncode == 2 and "dfjax convert: error:" in module.stderr
    assert "Traceback" not in module.stderr and not (tmp_path / "out").exists()
