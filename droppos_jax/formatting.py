"""Short texts for people: an error in one line, a duration, a size.

Stdlib only, so that any module (and the entry points, before their heavy
imports) can use them.
"""
from __future__ import annotations

import math

# The longest message kept of an error: enough to name a file and a reason.
MAX_MESSAGE = 240


def first_line(text: str) -> str:
  """The first line of `text`, stripped ('' for a blank text)."""
  lines = str(text).strip().splitlines()
  return lines[0] if lines else ''


def one_line(error: BaseException) -> str:
  """`Type: first line of its message`, cut to MAX_MESSAGE characters.

  TensorStore appends its whole spec to the message: that is dropped.
  """
  text = first_line(str(error)).split(' [tensorstore_spec=')[0]
  if len(text) > MAX_MESSAGE:
    text = text[:MAX_MESSAGE] + '...'
  return f'{type(error).__name__}: {text}' if text else type(error).__name__


def clock(seconds: float) -> str:
  """H:MM:SS, as a progress line's ETA ('?' when unknown)."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def duration(seconds: float) -> str:
  """An estimate in the unit that reads best: 12.5 ms, 3.2 s, 40 min, 1.5 h,
  6.3 days."""
  if seconds < 1:
    return f'{seconds * 1e3:.3g} ms'
  if seconds < 120:
    return f'{seconds:.1f} s'
  if seconds < 2 * 3600:
    return f'{seconds / 60:.0f} min'
  if seconds < 2 * 86400:
    return f'{seconds / 3600:.1f} h'
  return f'{seconds / 86400:.1f} days'


def size(num_bytes: float) -> str:
  """MiB below a tenth of a GiB, else GiB."""
  if abs(num_bytes) < 2**30 / 10:
    return f'{num_bytes / 2**20:.1f} MiB'
  return f'{num_bytes / 2**30:.2f} GiB'
