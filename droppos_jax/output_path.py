"""The check every command runs on where it will write, before writing."""
from __future__ import annotations

from etils import epath

from droppos_jax.errors import UserError


def check_output_path(path: str, *, folder: bool, flag: str) -> None:
  """Refuses an output location that cannot be written as asked: a file
  where a folder is wanted (or the reverse), or a path under a file."""
  path = epath.Path(path)
  if path.exists() and path.is_dir() != folder:
    raise UserError(
        f'--{flag} {path} is a {"file" if folder else "folder"}; expected '
        f'{"a folder (new or existing)" if folder else "a file name"}.')
  for parent in path.parents:
    if parent.exists():
      if not parent.is_dir():
        raise UserError(f'--{flag} {path}: {parent} is a file, not a folder.')
      break
