"""Data sources: a data config opened and validated once.

`open_source(cfg)` lists a folder, checks a demo config or opens a prepared
TFDS dataset, and returns a `Source` that knows its size, labels and how it
can be read, so that step counting, the streams, fine-tuning's class count
and the evaluators never list or open anything again.

How a source can be read decides what its stream guarantees (streams.py):
- folder, demo and TFDS prepared as ArrayRecord are read by index: each
  epoch is a fresh global permutation, the same on any host count, and a
  resume starts at once. ArrayRecord reads one record per storage request;
  the stream keeps `data.reads_in_flight` of them in flight, since on cloud
  storage each takes tens of milliseconds.
- TFDS prepared as TFRecord (the TFDS default) is read file by file; `note`
  says what it gives instead, and the trainers log it.

No TensorFlow here, so validating a folder or demo config stays cheap; TFDS
sources import tensorflow_datasets (which itself does not import TF).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from etils import epath
import numpy as np

from droppos_jax.data import demo
from droppos_jax.errors import UserError

IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.webp')
RANDOM_ACCESS_NOTE = ('random access: a fresh global permutation every epoch, '
                      'the same batches on any host count, resume at once')
TFRECORD_NOTE = (
    'TFRecord: file order reshuffled every epoch, {cycle} files interleaved, '
    'records shuffled in windows of {window}; the order depends on the host '
    'count; resume skips whole files and reads (not decodes) at most one '
    'round of {cycle} files. For a global order on any host count, prepare '
    'the dataset with `tfds build --file_format=array_record`.')
# TFRecord reading: files interleaved per round, records shuffled per window,
# each file read TFRECORD_BUFFER bytes at a time (hundreds of records; on
# gs:// TensorFlow's GCS file system fetches its own 64 MiB blocks, one
# request each, and larger reads here cost more CPU per record).
TFRECORD_CYCLE = 4
TFRECORD_WINDOW = 1024
TFRECORD_BUFFER = 16 << 20
# ArrayRecord: record reads kept in flight (one thread each) when
# data.reads_in_flight is unset: at 30 ms a read, up to 34,000 records/s
# where the CPU keeps up (benchmarks/input_latency.py). More threads than
# the maximum would cost more memory than they could add.
READS_IN_FLIGHT = 1024
MAX_READS_IN_FLIGHT = 16384


@dataclasses.dataclass(frozen=True)
class RecordFile:
  """A TFRecord file of a split: records [skip, skip + take) belong to it."""
  path: str
  skip: int
  take: int


@dataclasses.dataclass(frozen=True)
class Source:
  """An opened source. Sizes and labels are known without reading a record.

  payload: what a record gives the decoder: 'path' (an image file to read),
    'pixels' (a uint8 [S, S, 3] image) or 'record' (a serialized TFDS
    example; `parse` turns it into (encoded image, label) inside tf.data).
  read: indices -> payloads (numpy), for random-access sources; None for
    TFRecord sources, which list `files` instead.
  labels: int32 [size] when known up front (folder, demo); None when they
    come out of `parse`.
  num_classes: None for unlabelled data.
  note: what order and resume this source gives, one line for the log.
  reads_in_flight: 0 when `read` is cheap (memory, a list of paths): the
    stream calls it once per batch. N > 0 when each record `read` reads is a
    storage request: the stream reads the batches ahead on N threads.
  """
  description: str
  size: int
  num_classes: int | None
  payload: str
  note: str
  read: Callable[[np.ndarray], np.ndarray] | None = None
  labels: np.ndarray | None = None
  files: tuple[RecordFile, ...] = ()
  parse: Callable[[Any], tuple[Any, Any]] | None = None
  pixels_shape: tuple[int, int, int] | None = None
  reads_in_flight: int = 0

  @property
  def random_access(self) -> bool:
    return self.read is not None

  def label_of(self, indices: np.ndarray) -> np.ndarray:
    """Labels of records `indices` when known up front, else -1."""
    if self.labels is None:
      return np.full(len(indices), -1, np.int32)
    return self.labels[indices]

  def record_names(self, indices) -> list[str]:
    """How an error message names records."""
    if self.payload == 'path':
      return [str(p) for p in self.read(np.asarray(indices))]
    return [f'record {i}' for i in indices]


def open_source(cfg) -> Source:
  """Opens the source a data config names (`cfg.source`, a SOURCES name);
  raises UserError naming a bad field."""
  source = cfg.get('source')
  if source not in SOURCES:
    raise UserError(f'Unknown data source {source!r}; valid sources are '
                    f'{list(SOURCES)}.')
  opened = SOURCES[source](cfg)
  if cfg.get('reads_in_flight') is not None and not opened.reads_in_flight:
    raise UserError(
        f'data.reads_in_flight={cfg.reads_in_flight} applies to TFDS data '
        f'prepared as ArrayRecord only, not to {opened.description}; unset it.')
  return opened


def _reads_in_flight(cfg) -> int:
  value = cfg.get('reads_in_flight')
  value = READS_IN_FLIGHT if value is None else value
  if (isinstance(value, bool) or not isinstance(value, int)
      or not 1 <= value <= MAX_READS_IN_FLIGHT):
    raise UserError(f'data.reads_in_flight={value!r} must be an integer from '
                    f'1 to {MAX_READS_IN_FLIGHT} (record reads kept in '
                    'flight, one thread each).')
  return value


# ------------------------------------------------------------------ demo ---

def _open_demo(cfg) -> Source:
  split = cfg.get('split') or 'train'
  crop = cfg.get('crop_size')
  crop = 96 if crop is None else crop
  num = demo.check_args(split, cfg.get('num_images'), crop)
  crop_seed = cfg.get('seed') or 0  # another seed: other crops, same photos

  @functools.cache
  def images():  # Cut from the photos on first read, not at opening.
    return demo.load_demo_images(num, crop, seed=crop_seed, split=split)[0]

  return Source(
      description=f'demo/{split} (crop seed {crop_seed})', size=num,
      num_classes=len(demo.CLASS_NAMES), payload='pixels',
      note=RANDOM_ACCESS_NOTE, read=lambda indices: images()[indices],
      labels=np.arange(num, dtype=np.int32) % len(demo.CLASS_NAMES),
      pixels_shape=(crop, crop, 3))


# ---------------------------------------------------------------- folder ---

def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')


def _images_under(directory: epath.Path) -> list[str]:
  """Sorted image files anywhere below `directory` (hidden entries skipped)."""
  found = []
  for root, dirs, names in directory.walk():
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    found += [str(root / n) for n in names if _is_image(n)]
  return sorted(found)


def _open_folder(cfg) -> Source:
  """A class-per-subfolder folder (labels: sorted subfolder index) or a flat
  folder of images (label 0)."""
  path = cfg.get('path')
  if not path:
    raise UserError("data.path must name an image folder for source 'folder'.")
  root = epath.Path(path)
  if not root.is_dir():
    raise UserError(f'data.path {path!r} is not an existing directory.')
  entries = sorted(e for e in root.iterdir() if not e.name.startswith('.'))
  classes = [e for e in entries if e.is_dir()]
  loose = [e for e in entries if _is_image(e.name)]
  if classes and loose:
    raise UserError(
        f'Folder {path!r} mixes class subfolders '
        f'{[c.name for c in classes[:3]]} with images at its top level '
        f'{[f.name for f in loose[:3]]}; use one layout: all images in class '
        'subfolders, or all at the top level (label 0).')
  if classes:
    per_class = [_images_under(c) for c in classes]
    files = [f for found in per_class for f in found]
    labels = np.repeat(np.arange(len(classes), dtype=np.int32),
                       [len(found) for found in per_class])
  else:
    files = [str(f) for f in loose]
    labels = np.zeros(len(files), np.int32)
  if not files:
    raise UserError(
        f'No images found in {path!r}; accepted extensions (any case) are '
        f'{", ".join(IMAGE_EXTENSIONS)}.')
  paths = np.asarray(files)
  return Source(
      description=f'folder {path}', size=len(files),
      num_classes=max(len(classes), 1), payload='path',
      note=RANDOM_ACCESS_NOTE, read=lambda indices: paths[indices],
      labels=labels)


# ------------------------------------------------------------------ tfds ---

def _tfds_builder(cfg):
  """The prepared TFDS builder `cfg` names; raises before anything is read."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, data_dir, split = cfg.get('name'), cfg.get('data_dir'), cfg.get('split')
  if not name or not split:
    raise UserError("Source 'tfds' needs data.name (e.g. 'imagenet2012') and "
                    f"data.split (e.g. 'train'); got {name!r} and {split!r}.")
  if data_dir and not epath.Path(data_dir).is_dir():
    raise UserError(f'data.data_dir {data_dir!r} does not exist.')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as err:
    raise UserError(f'Unknown tfds dataset {name!r}; tfds.list_builders() '
                    'lists the registered names.') from err
  if not builder.is_prepared():
    raise UserError(
        f'tfds dataset {name!r} is not prepared in {builder.data_dir!r} and '
        'will not be downloaded here; prepare it first (e.g. `tfds build '
        f'{name} --data_dir=... --manual_dir=...`) or set data.data_dir.')
  try:
    builder.info.splits[split]
  except (KeyError, ValueError) as err:
    raise UserError(f'tfds dataset {name!r} has no split {split!r}; it has '
                    f'{sorted(builder.info.splits)}.') from err
  if 'image' not in builder.info.features:
    raise UserError(f'tfds dataset {name!r} has no "image" feature.')
  return builder


def _open_tfds(cfg) -> Source:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _tfds_builder(cfg)
  info, split = builder.info, cfg.split
  features = info.features
  label = features['label'] if 'label' in features else None
  num_classes = getattr(label, 'num_classes', None)

  def parse(serialized):
    example = features.deserialize_example(
        serialized, decoders={'image': tfds.decode.SkipDecoding()})
    return example['image'], (example['label'] if num_classes else -1)

  common = dict(description=f'tfds {cfg.name}:{split}',
                size=info.splits[split].num_examples, num_classes=num_classes,
                payload='record', parse=parse)
  formats = info.available_file_formats() or {info.file_format}
  if tfds.core.file_adapters.FileFormat.ARRAY_RECORD in formats:
    reads = _reads_in_flight(cfg)
    records = builder.as_data_source(
        split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
        file_format='array_record')
    # One key at a time: array_record reads a single key on the calling
    # thread, but a list of keys on its one global pool of 64 threads, which
    # would cap the reads in flight at 64 however many threads call it.
    return Source(note=RANDOM_ACCESS_NOTE,
                  read=lambda indices: np.asarray(
                      [records[i] for i in indices.tolist()], object),
                  reads_in_flight=reads, **common)
  files = tuple(RecordFile(str(f.filename), int(f.skip), int(f.take))
                for f in info.splits[split].file_instructions)
  return Source(note=TFRECORD_NOTE.format(cycle=TFRECORD_CYCLE,
                                          window=TFRECORD_WINDOW),
                files=files, **common)


# name -> opener(data config) -> Source: a new source is one function here
# (or in its own module) plus its name.
SOURCES = {
    'demo': _open_demo,
    'folder': _open_folder,
    'tfds': _open_tfds,
}
