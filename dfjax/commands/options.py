"""Flags several commands share, with their choices and help texts taken from where they are defined.

Strategy names and descriptions come from the registry (`sharding.strategies`), GroupNorm modes
from `GroupNormMode`, so a new strategy or mode shows up in every command without editing one.
"""

from __future__ import annotations

from collections.abc import Sequence

from sharding.exchange.groupnorm import GroupNormMode
from sharding.strategies import option_names, strategy_class, strategy_names


def strategies_over(axis: str) -> str:
  """The registered strategies that split an image over mesh `axis`, e.g. 'exact, displaced, naive'."""
  return ", ".join(n for n in strategy_names() if axis in strategy_class(n).axes)


def strategies_taking(option: str) -> str:
  """The registered strategies that take `option` (a dataclass field), e.g. 'displaced'."""
  return ", ".join(n for n in strategy_names() if option in option_names(n))


def add_strategy_argument(parser, default: Sequence[str], what: str, names: Sequence[str] | None = None) -> None:
  """--strategy NAME…: one or more of `names` (default: every registered strategy), each described in the help."""
  names = strategy_names() if names is None else tuple(names)
  described = "; ".join(f"{n}: {strategy_class(n).description}" for n in names)
  parser.add_argument("--strategy", nargs="+", choices=names, default=list(default),
                      metavar="NAME", help=_escaped(f"{what} (default {' '.join(default)}). {described}"))


def add_groupnorm_argument(parser, default, *, several: bool = False) -> None:
  """--groupnorm, its modes named from GroupNormMode (checked, with the fix, by GroupNormMode.parse)."""
  modes = ", ".join(m.value for m in GroupNormMode)
  shown = " ".join(default) if several else default
  parser.add_argument("--groupnorm", nargs="+" if several else None,
                      default=list(default) if several else default,
                      help=f"{strategies_taking('groupnorm')} GroupNorm mode{'s' if several else ''}: "
                      f"{modes} (default {shown})")


def _escaped(text: str) -> str:
  """`text` as an argparse help string (which %-formats it)."""
  return text.replace("%", "%%")
