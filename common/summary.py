"""The few lines a training run ends with: its key metric next to a trivial baseline, and where the
outputs are. Shared so every task's summary reads the same way."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Metric:
    name: str                 # as in log.csv, e.g. "val_loss"
    value: float
    baseline: float
    higher_is_better: bool
    unit: str = ""            # " dB"
    relative: bool = False    # compare as a percentage (losses, MSE) instead of a difference


def verdict(m: Metric) -> str:
    if not (math.isfinite(m.value) and math.isfinite(m.baseline)):
        return "not comparable (non-finite)"
    better = m.value > m.baseline if m.higher_is_better else m.value < m.baseline
    if m.relative and m.baseline != 0:
        pct = abs(100.0 * (m.value / m.baseline - 1.0))
        change = f"{pct:.{1 if pct < 10 else 0}f}% {'higher' if m.value > m.baseline else 'lower'}"
    else:
        change = f"{m.value - m.baseline:+.4g}{m.unit}"
    if m.value == m.baseline:
        return "equal to the baseline"
    return f"{change}, {'better' if better else 'WORSE'} than the baseline"


def format_summary(title: str, metrics: list[Metric], baseline_name: str, out_dir: Path | str,
                   files: list[str], data: str | None = None, next_steps: list[str] = (),
                   notes: list[str] = ()) -> str:
    """
    summary: <title>
      val_loss   0.0023 (baseline 0.0063): 64% lower, better than the baseline
      baseline:  <what the baseline is>
      also:      <other numbers of the best epoch>
      data:      <where the data came from>
      outputs:   RUN/ (best.pt, last.pt, ...)
      next:      python ...
    """
    width = max([len(m.name) for m in metrics] + [8]) + 1
    lines = [f"summary: {title}"]
    for m in metrics:
        lines.append(f"  {m.name + ':':<{width}} {m.value:.4g}{m.unit} (baseline {m.baseline:.4g}{m.unit}): {verdict(m)}")
    lines.append(f"  {'baseline:':<{width}} {baseline_name}")
    for i, note in enumerate(notes):
        lines.append(f"  {('also:' if i == 0 else ''):<{width}} {note}")
    if data:
        lines.append(f"  {'data:':<{width}} {data}")
    lines.append(f"  {'outputs:':<{width}} {out_dir}/ ({', '.join(files)})")
    for i, step in enumerate(next_steps):
        lines.append(f"  {('next:' if i == 0 else ''):<{width}} {step}")
    return "\n".join(lines)
