"""A pipeline timeline drawn for people: one row per device, as text and as a PNG chart."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from dfjax.training.pipeline_schedule import BACKWARD, FORWARD, Timeline

_GLYPH = {FORWARD: "F", BACKWARD: "B"}
_COLOUR = {FORWARD: (66, 133, 244), BACKWARD: (234, 67, 53)}
_FROZEN_COLOURS = [(52, 168, 83), (251, 188, 5), (155, 89, 182), (0, 172, 193)]


def _frozen_names(timeline: Timeline) -> list[str]:
  return sorted({a.action.job for a in timeline.actions if a.action.job})


def describe(timeline: Timeline, width: int = 96) -> str:
  """A text chart (F forward, B backward, a letter per frozen job, · idle) and the figures under it."""
  span = max((a.end for a in timeline.actions), default=0.0) or 1.0
  letters = {name: chr(ord("a") + i) for i, name in enumerate(_frozen_names(timeline))}
  lines = [f"{timeline.schedule.value}: {timeline.stages} stages × {timeline.microbatches} micro-batches, "
           f"cuts at segments {list(timeline.cuts)}"]
  for stage in range(timeline.stages):
    row = ["·"] * width
    for timed in timeline.on_stage(stage):
      glyph = letters.get(timed.action.job) or _GLYPH[timed.action.kind]
      first, last = int(timed.start / span * width), max(int(timed.start / span * width) + 1, int(timed.end / span * width))
      for i in range(first, min(last, width)):
        row[i] = glyph
    lines.append(f"device {stage} |{''.join(row)}|")
  legend = ", ".join(f"{letter} = {name}" for name, letter in letters.items())
  lines.append(f"iteration {timeline.makespan:.4g}, bubbles {100 * timeline.bubble_fraction:.1f} % of device time"
               + (f", frozen work left for after the pipeline {timeline.leftover:.4g}" if timeline.leftover else "")
               + (f"; {legend}" if legend else ""))
  return "\n".join(lines)


def draw(timeline: Timeline, path: str | Path, *, width: int = 1200, row_height: int = 36) -> Path:
  """The timeline as a PNG Gantt chart (one row per device) at `path`."""
  margin, label = 12, 80
  span = max((a.end for a in timeline.actions), default=0.0) or 1.0
  height = 2 * margin + timeline.stages * row_height + 24
  image = Image.new("RGB", (width, height), "white")
  pen = ImageDraw.Draw(image)
  colours = {name: _FROZEN_COLOURS[i % len(_FROZEN_COLOURS)] for i, name in enumerate(_frozen_names(timeline))}
  scale = (width - label - 2 * margin) / span
  for stage in range(timeline.stages):
    top = margin + stage * row_height
    pen.text((margin, top + row_height // 3), f"device {stage}", fill="black")
    for timed in timeline.on_stage(stage):
      x0, x1 = label + margin + timed.start * scale, label + margin + timed.end * scale
      colour = colours.get(timed.action.job) or _COLOUR[timed.action.kind]
      pen.rectangle([x0, top + 4, max(x1 - 1, x0 + 1), top + row_height - 4], fill=colour)
      if timed.action.microbatch >= 0 and x1 - x0 > 10:
        pen.text((x0 + 2, top + row_height // 3), str(timed.action.microbatch), fill="white")
  pen.text((margin, height - margin - 12), f"{timeline.schedule.value}: iteration {timeline.makespan:.4g}, "
           f"bubbles {100 * timeline.bubble_fraction:.1f} %", fill="black")
  path = Path(path)
  image.save(path)
  return path
