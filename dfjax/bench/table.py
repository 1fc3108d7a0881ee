"""Printed tables: rows are data (a benchmark's result records), columns say how a row becomes text.

Every `dfjax bench …` and `dfjax generate` table goes through `render` (or `header` and `line`
for a table printed row by row while it is measured), so the commands return their rows and
tests read those, never printed cells.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

SEPARATOR = " "


@dataclasses.dataclass(frozen=True)
class Column:
  """One column of a table.

  Attributes:
    header: the column's title.
    value: the row's attribute of that name, or a function of the row; a str result is written as
      it is, None as `missing`, a number times `scale` with `spec`.
    spec: format spec of the value, e.g. ".2f".
    width: the least width (the header always fits); longer cells widen only their own row.
    scale: the unit change, e.g. 1e3 for seconds shown as ms.
    align: ">" right (numbers) or "<" left (names).
    missing: what a None value is written as.
    group: a title shared by neighbouring columns, written above them on a line of its own.
  """

  header: str
  value: str | Callable[[Any], Any]
  spec: str = ""
  width: int = 0
  scale: float = 1
  align: str = ">"
  missing: str = "—"
  group: str = ""

  @property
  def size(self) -> int:
    return max(self.width, len(self.header))

  def cell(self, row) -> str:
    value = getattr(row, self.value) if isinstance(self.value, str) else self.value(row)
    if value is None:
      text = self.missing
    else:
      text = value if isinstance(value, str) else format(value * self.scale, self.spec)
    return f"{text:{self.align}{self.size}}"


def header(columns: Sequence[Column], indent: str = "") -> str:
  """The header line, under a line of group titles when some column has a group."""
  titles = indent + SEPARATOR.join(f"{c.header:{c.align}{c.size}}" for c in columns)
  if not any(c.group for c in columns):
    return titles.rstrip()
  spans = []
  for group, members in itertools.groupby(columns, key=lambda c: c.group):
    span = len(SEPARATOR.join(" " * c.size for c in members))
    spans.append(f" {group} ".center(span, "─") if group else " " * span)
  return (indent + SEPARATOR.join(spans)).rstrip() + "\n" + titles.rstrip()


def line(columns: Sequence[Column], row, indent: str = "") -> str:
  """One row's line."""
  return (indent + SEPARATOR.join(c.cell(row) for c in columns)).rstrip()


def render(columns: Sequence[Column], rows: Iterable, indent: str = "") -> str:
  """The whole table: header, then one line per row."""
  return "\n".join([header(columns, indent), *(line(columns, row, indent) for row in rows)])
