"""The one exception type for mistakes a user can fix (a bad config value,
a missing file, a foreign checkpoint, a full disk). Entry points print it as
one line and exit with status 1; any other exception is a bug and keeps its
traceback."""
from __future__ import annotations

import contextlib
from typing import Iterator


class UserError(ValueError):
  """Bad user input; the message names the bad value and what would be valid."""


@contextlib.contextmanager
def writing(path) -> Iterator[None]:
  """Turns a refused write of a user's output file (full disk, no permission,
  a file where a folder should be) into a one-line UserError naming it."""
  try:
    yield
  except OSError as e:
    raise UserError(f'Cannot write {path}: {e.strerror or e}.') from None
