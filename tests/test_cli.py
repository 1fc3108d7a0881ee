"""The `dfjax` command's plumbing: subcommands run end to end and bad input exits cleanly."""

import json

import pytest

from dfjax import commands
from sharding.axes import PATCH
from sharding.strategies import Strategy, base

TWO_LEVEL_UNET = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4,
    "cross_attention_dim": 32, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}


def test_bench_strategies_prints_measured_beside_analytic(tmp_path, capsys):
  config = tmp_path / "config.json"
  config.write_text(json.dumps(TWO_LEVEL_UNET))
  code = commands.main(["bench", "strategies", "--config", str(config), "--resolution", "128", "--patch",
                        "2", "--steps", "3", "--warmup-steps", "1", "--iters", "1"])
  assert code == 0
  rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
          if line.split() and line.split()[0] in ("single", "exact", "displaced", "naive")}
  assert set(rows) == {"single", "exact", "displaced", "naive"}
  for name in ("exact", "displaced"):  # comm MiB/step measured == analytic, stale measured == analytic
    measured, analytic, stale, stale_analytic = rows[name][-4:]
    assert measured == analytic and float(measured) > 0
    assert stale == stale_analytic
  assert float(rows["displaced"][-2]) > 0 and float(rows["naive"][-4]) == 0


def test_bad_input_exits_with_a_message_not_a_traceback(tmp_path, capsys):
  assert commands.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
  assert "dfjax convert: error:" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
  assert commands.main(["bench", "unet", "--config", "no-such-preset", "--no-torch"]) == 2
  assert "preset" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    commands.main(["bench", "strategies", "--cfg", "3"])


def test_strategy_choices_and_help_come_from_the_registry(monkeypatch, capsys):
  """A strategy registered after import is a --strategy choice, listed with its description."""
  monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the toy leaves the registry with the test
  monkeypatch.setattr(Strategy, "toy", None, raising=False)  # and its constructor on Strategy

  class Toy(Strategy):
    name = "toy"
    description = "a strategy this test registers"
    axes = frozenset({PATCH})  # splits rows: bench simulate offers it too

  parser = commands.build_parser()
  assert parser.parse_args(["generate", "--strategy", "single", "toy"]).strategy == ["single", "toy"]
  assert parser.parse_args(["bench", "simulate", "--strategy", "toy"]).strategy == ["toy"]
  with pytest.raises(SystemExit):
    parser.parse_args(["generate", "--help"])
  help_text = " ".join(capsys.readouterr().out.split())
  assert "toy: a strategy this test registers" in help_text
  assert "displaced: DistriFusion:" in help_text
