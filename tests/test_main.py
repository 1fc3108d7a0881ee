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


def _run_both(*commands: list[str]) -> list[subprocess.CompletedProcess]:
  """Each `python COMMAND…`, run side by side (each spends seconds importing jax)."""
  started = [subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT) for command in commands]
  outputs = [p.communicate(timeout=300) for p in started]
  return [subprocess.CompletedProcess(p.args, p.returncode, *output) for p, output in zip(started, outputs)]


@pytest.mark.parametrize("case", ["help", "bad input"])
def test_python_m_dfjax_is_the_dfjax_command(case, tmp_path):
  args = (["--help"] if case == "help" else ["convert", str(tmp_path / "missing"), str(tmp_path / "out")])
  script, module = _run_both(["-c", _console_script(), *args], ["-m", "dfjax", *args])
  same = (module.returncode, module.stdout, module.stderr) == (script.returncode, script.stdout, script.stderr)
  assert same, (module, script)
  if case == "help":
    assert module.returncode == 0 and module.stdout.startswith("usage: dfjax ")
    assert all(command in module.stdout for command in ("convert", "generate", "bench", "train"))
  else:
    assert module.returncode == 2 and "dfjax convert: error:" in module.stderr
    assert "Traceback" not in module.stderr and not (tmp_path / "out").exists()
