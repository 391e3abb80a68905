"""The files of a saved step, for tests that damage checkpoints."""
import pathlib


def data_files(step: pathlib.Path) -> list[pathlib.Path]:
  """The data files of step folder `step`'s state (in the `d` folders of
  its OCDBT store), smallest first."""
  return sorted((p for p in (step / 'state').rglob('*')
                 if p.is_file() and p.parent.name == 'd'),
                key=lambda p: p.stat().st_size)
