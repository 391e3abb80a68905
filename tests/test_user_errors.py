"""The catalogue of user slips: every command refuses each with one line
that names the bad value and what would be valid, before compiling or
writing anything; odd but valid images train and evaluate; and the real
command lines answer `error: ...` with status 1, never a traceback.

Slips that other test files already try are not repeated here: the run's
workdir, lock and cadences (test_run_policy.py), batch/patch/mesh/grad-accum
and missing data folders (test_train.py), mix.prob, crop_scale and protocol
(test_finetune.py), data source fields and TFDS (test_sources.py), a corrupt
JPEG header (test_streams.py), damaged Orbax steps, empty folders, junk and
unrelated weight files (test_weights.py), output suffixes (test_export.py),
online-evaluation settings (test_online_eval.py), multi-host flags
(test_multihost.py) and `:arg` values (test_configs.py).
"""
import errno
import importlib.util
import io
import logging as std_logging
import os
import pathlib
import re
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from droppos_jax import checkpoint, export, finetune, probe_position
from droppos_jax import launch, train, training_loop, visualize
from droppos_jax.configs import export as export_config
from droppos_jax.configs import finetune as finetune_config
from droppos_jax.configs import linear_probe as linear_probe_config
from droppos_jax.configs import position_probe as position_probe_config
from droppos_jax.configs import pretrain as pretrain_config
from droppos_jax.configs import visualize as visualize_config
from droppos_jax.data import sources, streams, transforms
from droppos_jax.errors import UserError
from test_weights import reference_state, save_run, write_foreign

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- configs ---

def set_fields(config, fields):
  for field, value in fields.items():
    node, _, leaf = field.rpartition('.')
    (config[node] if node else config)[leaf] = value
  return config


def pretrain_cfg():
  """configs/pretrain.py:runlocal with mu/8 at 32 px on 32 demo crops."""
  c = pretrain_config.get_config('runlocal')
  c.image_size = 32
  c.model.variant = 'mu/8'
  c.data.num_images, c.data.crop_size = 32, 40
  c.num_train_steps = 4
  return c


def probe_cfg():
  c = position_probe_config.get_config()
  c.variant, c.image_size = 'mu/8', 32
  return c


# command -> (its config, the command as launch.run calls it)
COMMANDS = {
    'train': (pretrain_cfg, train.train),
    'finetune': (lambda: finetune_config.get_config('runlocal'), finetune.train),
    'linear_probe': (lambda: linear_probe_config.get_config('runlocal'),
                     finetune.train),
    'probe_position': (probe_cfg, probe_position.probe),
    'visualize': (visualize_config.get_config, visualize.visualize),
    'export': (export_config.get_config, export.run),
}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Things a user may point a command at, by name."""
  root = tmp_path_factory.mktemp('files')
  (root / 'notes.txt').write_text('my notes\n')
  rng = np.random.default_rng(0)
  image = lambda: Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8))
  for name, layout in (('tiffs', ['a.tif', 'b.tiff']),
                       ('flat', [f'{i}.png' for i in range(16)]),
                       ('two', [f'c{i % 2}/{i}.png' for i in range(16)]),
                       ('three', [f'c{i % 3}/{i}.png' for i in range(6)])):
    for rel in layout:
      (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
      image().save(root / name / rel, format='PNG' if rel.endswith('.png')
                   else 'TIFF')
  write_foreign(reference_state('encoder'), root / 'encoder.npz')
  for suffix in ('.safetensors', '.pth', '.npz'):
    if suffix == '.pth' and importlib.util.find_spec('torch') is None:
      continue
    whole = root / f'whole{suffix}'
    write_foreign(reference_state('encoder'), whole)
    data = whole.read_bytes()
    (root / f'cut{suffix}').write_bytes(data[:len(data) // 2])
  (root / 'random.pth').write_bytes(rng.bytes(4096))
  save_run(root / 'pretraining', 'droppos')
  save_run(root / 'finetuning', 'classifier')
  return root


def forbid_compiling(monkeypatch, command):
  """A slip that passed validation fails the test when it compiles."""
  def fail(*args, **kwargs):
    raise AssertionError('compiled before refusing the slip')
  monkeypatch.setattr(training_loop.Setup, 'compile', fail)
  if command in ('finetune', 'linear_probe'):  # it also jits its init, eval

    class Uncompilable:  # jit may wrap; compiling or running one fails
      def __init__(self, *args, **kwargs):
        del args, kwargs
      __call__ = lower = fail

    monkeypatch.setattr(finetune.jax, 'jit', Uncompilable)


A = r'\[0, 1\)'
CASES = [
    # ------------------------------------------- pre-training config values
    ('train', {'image_size': 0},
     r'^image_size=0; expected a positive int or \(height, width\)\.$'),
    ('train', {'model.variant': 'B16'},
     r"^Unknown ViT variant 'B16'; expected \"<size>/<patch>\" with size in "
     r"\[.*'mu', 'nano'\] and a positive patch size, e\.g\. \"B/16\"\.$"),
    ('train', {'model.variant': 'mu/0'},
     r"^Patch size in variant 'mu/0' must be positive\.$"),
    ('train', {'model.projector': 'huge'},
     r"^Unknown projector 'huge'; choose from \['default', 'small', 'tiny'\]"),
    ('train', {'model.head': 'mlp'},
     r"^model\.head='mlp'; registered: transformer, linear\.$"),
    ('train', {'model.head': 'linear', 'model.projector_width': 64},
     r"^model\.head='linear' has no width: unset the projector_\* fields"),
    ('train', {'objective.name': 'mae'},
     r"^objective\.name='mae' needs model\.decoder_width, model\.decoder_depth, "
     r"model\.decoder_heads, objective\.norm_pix_loss, which this config lacks "
     r"\(it was made for another objective\); start from "
     r"configs/mae_pretrain\.py instead\.$"),
    ('train', {'objective.name': 'beit'},
     r"^objective\.name='beit'; registered: droppos, mae\.$"),
    ('train', {'masking.strategy': 'grid'},
     r"^masking\.strategy='grid'; registered: random, block\.$"),
    ('train', {'model.projector_width': 30},
     r'^Projector width 30 is not divisible by 4 heads'),
    ('train', {'model.dtype': 'float8'},
     r"^model\.dtype='float8'; valid: \['bfloat16', 'float32'\]\.$"),
    ('train', {'masking.mask_ratio': 1.0},
     rf'^mask_ratio=1\.0 is outside the valid range {A}\.$'),
    ('train', {'masking.mask_ratio': 0.99},
     r'^mask_ratio=0\.99 leaves no visible patch out of 16; use mask_ratio '
     r'<= 0\.9375\.$'),
    ('train', {'masking.pos_drop_ratio': 0.0},
     r'^pos_drop_ratio=0\.0 drops no position among the 4 visible patches; '
     r'use pos_drop_ratio >= 0\.2500 so there is something to predict\.$'),
    ('train', {'objective.tau': 0.0},
     r'^tau=0\.0 must be > 0 \(the paper uses 0\.1\)\.$'),
    ('train', {'objective.sigma': -1.0},
     r'^sigma=-1\.0 must be >= 0 \(0 means one-hot targets\)\.$'),
    ('train', {'objective.sigma_schedule': 'exp'},
     r"^Unknown sigma schedule 'exp'; valid: \('linear_epoch', 'linear', "
     r"'cosine', 'constant'\)\.$"),
    ('train', {'objective.official_quirks': True},
     r'^official_grid_width=2 \(objective\.official_quirks: .*\) gives 4 '
     r'positions, fewer than the 16 patches of the 4x4 grid; set '
     r'objective\.official_quirks=False'),
    ('train', {'data.source': 'folder', 'data.path': '{files}/notes.txt'},
     r"^data\.path '\S+/notes\.txt' is not an existing directory\.$"),
    ('train', {'data.source': 'folder', 'data.path': '{files}/tiffs'},
     r"^No images found in '\S+/tiffs'; accepted extensions \(any case\) are "
     r'\.bmp, \.gif, \.jpeg, \.jpg, \.png, \.webp\.$'),
    ('train', {'data.crop_size': 0}, r'^Demo crop_size must be >= 1, got 0\.$'),
    ('train', {'batch_size': 1024},
     r'^batch_size=1024 exceeds the 32 training examples; lower it\.$'),
    ('train', {'batch_size': -8},
     r'^batch_size=-8 must be a positive multiple of the 8 devices'),
    ('train', {'grad_accum_steps': 0}, r'^grad_accum_steps=0 must be >= 1\.$'),
    ('train', {'num_train_steps': -1, 'epochs': 0},
     r'^epochs=0 must be > 0 \(or set num_train_steps > 0\)\.$'),
    ('train', {'num_train_steps': 0},
     r'^num_train_steps=0 must be > 0, or -1 to train for epochs=800\.$'),
    ('train', {'warmup_epochs': -1}, r'^warmup_epochs=-1 must be >= 0\.$'),
    ('train', {'warmup_epochs': 2},
     r'^warmup_epochs=2 \(4 steps\) must be shorter than the run \(4 steps\); '
     r'reduce it\.$'),
    ('train', {'optim.blr': 0.0},
     r'^optim\.blr=0\.0 must be > 0 \(the paper uses 1\.5e-4 for '
     r'pre-training, 1e-3 for fine-tuning\)\.$'),
    ('train', {'optim.min_lr': -1e-6},
     r'^optim\.min_lr=-1e-06 must be in \[0, 9\.37e-06\] \(the peak lr, '
     r'optim\.blr \* batch_size / 256\)\.$'),
    ('train', {'optim.min_lr': 1e-3}, r'^optim\.min_lr=0\.001 must be in \[0, '),
    ('train', {'optim.b1': 1.0}, rf'^optim\.b1=1\.0 must be in {A} \(a decay '),
    ('train', {'optim.b1': -0.1}, rf'^optim\.b1=-0\.1 must be in {A}'),
    ('train', {'optim.b2': 1.5}, rf'^optim\.b2=1\.5 must be in {A}'),
    ('train', {'optim.weight_decay': -0.05},
     r'^optim\.weight_decay=-0\.05 must be >= 0\.$'),
    ('train', {'optim.clip': 'norm'},
     r"^optim\.clip='norm'; valid: \('per_tensor', 'global', 'none'\)\.$"),
    ('train', {'optim.clip_norm': 0.0}, r'^optim\.clip_norm=0\.0 must be > 0\.$'),
    ('train', {'num_devices': 16},
     r'^num_devices=16 but 8 devices are available; use -1 for all of them\.$'),
    ('train', {'log_every': 0}, r'^log_every=0 must be >= 1\.$'),
    ('train', {'profile_steps': (-1, 3)},
     r'^profile_steps=\(-1, 3\) must be \(first, stop\) with 0 <= first < '
     r'stop, or \(0, 0\) for no profile\.$'),
    ('train', {'device_resize_window': -2},
     r'^device_resize_window=-2 must be -1 \(by platform: 512 on TPUs and '
     r'GPUs, 0 on CPUs\), 0 \(resize on the host\) or a window size in '
     r'pixels, e\.g\. 512\.$'),
    ('train', {'device_resize_window': 16},
     r'^device_resize_window=16 needs a square image_size of at most 16 '
     r'pixels, got \(32, 32\); or set it to 0 \(resize on the host\)\.$'),
    # -------------------------------------------- fine-tuning config values
    ('finetune', {'num_classes': 4},
     r'^num_classes=4 is fewer than the 7 classes of demo/train'),
    ('finetune', {'data.source': 'folder', 'data.path': '{files}/flat',
                  'val_data.source': 'folder', 'val_data.path': '{files}/flat'},
     r'^1 class\(es\): a classifier needs >= 2 \(set num_classes or use a '
     r'folder with a subfolder per class\)\.$'),
    ('finetune', {'data.source': 'folder', 'data.path': '{files}/two',
                  'val_data.source': 'folder', 'val_data.path': '{files}/three'},
     r'^val_data: folder \S+/three has 3 classes, more than the 2 the model '
     r'predicts; set num_classes or use the classes of data\.$'),
    ('finetune', {'model.drop_path_rate': 1.0},
     rf'^model\.drop_path_rate=1\.0 must be in {A}\.$'),
    ('finetune', {'optim.layer_decay': 0.0},
     r'^optim\.layer_decay=0\.0 must be in \(0, 1\]\.$'),
    ('finetune', {'optim.layer_decay': 1.5},
     r'^optim\.layer_decay=1\.5 must be in \(0, 1\]\.$'),
    ('finetune', {'optim.b2': 1.0}, rf'^optim\.b2=1\.0 must be in {A}'),
    ('finetune', {'optim.weight_decay': -1.0},
     r'^optim\.weight_decay=-1\.0 must be >= 0\.$'),
    ('finetune', {'mix.mixup_alpha': -1.0},
     r'^mix\.mixup_alpha=-1\.0 must be >= 0 \(0 = off\)\.$'),
    ('finetune', {'mix.label_smoothing': 1.0},
     rf'^mix\.label_smoothing=1\.0 must be in {A}\.$'),
    ('finetune', {'mix.switch_prob': 1.5},
     r'^mix\.switch_prob=1\.5 is a probability in \[0, 1\]\.$'),
    ('finetune', {'augment.randaugment_layers': -1},
     r'^augment\.randaugment_layers=-1 must be >= 0'),
    ('finetune', {'augment.randaugment_magnitude': 50.0},
     r'^augment\.randaugment_magnitude=50\.0 must be in \[0, 10\]'),
    ('finetune', {'augment.random_erasing': 1.5},
     r'^augment\.random_erasing=1\.5 is a probability'),
    ('finetune', {'eval_every_epochs': 0}, r'^eval_every_epochs=0 must be >= 1\.$'),
    ('finetune', {'eval_batch_size': 12},
     r'^eval_batch_size=12 must be a positive multiple of the 8 devices'),
    ('finetune', {'protocol': 'linear_probe'},
     r"^protocol='linear_probe' needs model\.feature, optim\.momentum, which "
     r'this config lacks \(it was made for another protocol\); start from '
     r'configs/linear_probe\.py instead\.$'),
    ('linear_probe', {'protocol': 'finetune'},
     r"^protocol='finetune' needs model\.drop_path_rate, model\.remat, "
     r'optim\.b1, optim\.b2, optim\.layer_decay, which this config lacks'),
    ('linear_probe', {'model.feature': 'avg'},
     r"^Probe feature 'avg'; valid: \('cls', 'gap'\)\.$"),
    ('linear_probe', {'optim.momentum': 1.0},
     rf'^optim\.momentum=1\.0 must be in {A} \(LARS momentum'),
    ('linear_probe', {'optim.weight_decay': -1.0},
     r'^optim\.weight_decay=-1\.0 must be >= 0\.$'),
    # ---------------------------------------------------- foreign init.path
    ('finetune', {'init.path': '{files}/random.pth'},
     r"^init\.path \S+/random\.pth is not a weights file \(it starts with the "
     r"bytes b'.*'\); accepted: a pre-training or fine-tuning workdir"),
    ('finetune', {'init.path': '{files}/cut.pth'},
     r'^init\.path \S+/cut\.pth is not a weights file \(it is a truncated or '
     r'damaged zip archive, the container of \.pth and \.npz files\); '
     r'accepted: '),
    ('finetune', {'init.path': '{files}/cut.npz'},
     r'^init\.path \S+/cut\.npz is not a weights file \(it is a truncated or '
     r'damaged zip archive'),
    ('finetune', {'init.path': '{files}/cut.safetensors'},
     r'^\S+/cut\.safetensors is not a readable \.safetensors file, truncated '
     r'or damaged \(SafetensorError: '),
    ('finetune', {'init.path': '{files}/pretraining/config.json'},
     r"^init\.path \S+/config\.json is not a weights file \(it starts with "
     r"'\{\"objective\""),
    # ------------------------------------------------ the other commands
    ('probe_position', {'num_devices': 9},
     r'^num_devices=9 but 8 devices are available'),
    ('probe_position', {'init.path': '{files}/cut.safetensors'},
     r'^\S+/cut\.safetensors is not a readable \.safetensors file'),
    ('probe_position', {'init.path': '{files}/encoder.npz', 'model.num_heads': 0},
     r'^num_heads=0 must be >= 1 \(or unset: from the weights\)\.$'),
    ('probe_position', {'init.path': '{files}/encoder.npz', 'model.num_heads': 3},
     r'^num_heads=3 does not divide the width 32 of \S+/encoder\.npz; use a '
     r'divisor of 32\.$'),
    ('probe_position', {'head.optimizer': 'lbfgs'},
     r"^head\.optimizer='lbfgs'; valid: \('adamw', 'sgd'\)\.$"),
    ('probe_position', {'head.steps': 0},
     r'^head\.steps=0 and head\.batch_size=1024 must be >= 1\.$'),
    ('probe_position', {'head.lr': -0.1},
     r'^head\.lr=-0\.1 must be > 0 and head\.weight_decay=0\.0001 >= 0\.$'),
    ('probe_position', {'mask_draws': 0}, r'^mask_draws=0 must be >= 1\.$'),
    ('visualize', {'init.path': '{files}/pretraining', 'num_images': 1000},
     r'^num_images=1000: at most 64 images fit one picture\.$'),
    ('visualize', {}, r'^--config\.init\.path is required: a DropPos '
     r'pre-training workdir, one of its step folders or a DropPos weights file'),
    ('visualize', {'init.path': '{files}/pretraining', 'num_images': 0},
     r'^num_images=0 must be >= 1\.$'),
    ('visualize', {'init.path': '{files}/pretraining', 'masking.mask_ratio': 1.5},
     rf'^mask_ratio=1\.5 is outside the valid range {A}\.$'),
    ('export', {'init.path': '{files}/pretraining', 'model.num_heads': 3},
     r'^num_heads=3 does not divide the width 32 of \S+/pretraining step 4; '),
    ('export', {'init.path': '{files}/pretraining', 'image_size': -1},
     r'^image_size=-1; expected a positive int or \(height, width\)\.$'),
    ('export', {'init.path': '{files}/random.pth'},
     r'^init\.path \S+/random\.pth is not a weights file'),
]


def _case_id(case):
  command, fields, _ = case
  text = ','.join(f'{k}={v}' for k, v in fields.items()) or 'defaults'
  return f'{command}:{text.replace("{files}/", "")}'


@pytest.mark.parametrize('command, fields, message', CASES,
                         ids=[_case_id(c) for c in CASES])
def test_a_slip_is_refused_in_one_line_before_anything_runs(
    files, tmp_path, monkeypatch, command, fields, message):
  if fields.get('init.path', '').endswith('/cut.pth'):
    pytest.importorskip('torch')   # to write the .pth that is cut
  forbid_compiling(monkeypatch, command)
  make_config, run = COMMANDS[command]
  config = set_fields(make_config(), {
      k: v.format(files=files) if isinstance(v, str) else v
      for k, v in fields.items()})
  output = tmp_path / ('out.png' if command == 'visualize' else
                       'out.npz' if command == 'export' else 'run')
  with pytest.raises(UserError) as err:
    run(config, str(output))
  assert re.search(message, str(err.value)), str(err.value)
  assert '\n' not in str(err.value)
  if command in ('finetune', 'linear_probe') and 'init.path' in fields:
    # The trainers read init.path only when there is no checkpoint to
    # resume, after claiming the workdir; holding no checkpoint, it takes
    # the corrected config (test_run_policy.py).
    assert not checkpoint.complete_steps(output / 'checkpoints')
  else:
    assert not output.exists()


# ------------------------------------------------------------- odd images ---

def _image(mode, rng):
  """(an image of `mode`, the RGB array a decoder must give for it)."""
  rgb = rng.integers(0, 256, (20, 24, 3), np.uint8)
  if mode == 'L':
    return Image.fromarray(rgb[..., 0]), np.repeat(rgb[..., :1], 3, -1)
  if mode == 'LA':
    image = Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), 'LA')
    return image, np.repeat(rgb[..., :1], 3, -1)
  if mode == 'RGBA':
    return Image.fromarray(np.dstack([rgb, rgb[..., 0]])), rgb
  if mode == 'P':
    image = Image.fromarray(rgb).quantize(64)
    palette = np.asarray(image.getpalette(), np.uint8).reshape(-1, 3)
    return image, palette[np.asarray(image)]
  if mode == 'I;16':  # 16-bit grey: the top 8 bits
    return Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), np.repeat(
        rgb[..., :1], 3, -1)
  if mode == '1x1':
    return Image.fromarray(rgb[:1, :1]), rgb[:1, :1]
  raise ValueError(mode)


ODD = ['L', 'LA', 'RGBA', 'P', 'I;16', '1x1']


@pytest.mark.parametrize('mode', ODD + ['CMYK JPEG', 'grey JPEG'])
def test_odd_images_decode_to_their_rgb_pixels(mode):
  rng = np.random.default_rng(ODD.index(mode) if mode in ODD else 9)
  buffer = io.BytesIO()
  if mode.endswith('JPEG'):
    source = Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8))
    source = source.convert('CMYK' if mode == 'CMYK JPEG' else 'L')
    source.save(buffer, format='JPEG', quality=95)
    # The decoded JPEG as PIL, the reference decoder, gives it.
    want = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert('RGB'))
  else:
    image, want = _image(mode, rng)
    image.save(buffer, format='PNG')
  got = transforms.decode(tf.constant(buffer.getvalue())).numpy()
  np.testing.assert_array_equal(got, want)


def write_odd_folder(root):
  """Two classes of 8: every odd mode, a CMYK and a grey JPEG, a GIF."""
  rng = np.random.default_rng(0)
  for i in range(16):
    folder = root / f'class_{i % 2}'
    folder.mkdir(parents=True, exist_ok=True)
    kind = i % 8
    if kind < len(ODD):
      _image(ODD[kind], rng)[0].save(folder / f'{i}.png')
    else:
      image = Image.fromarray(rng.integers(0, 256, (30, 26, 3), np.uint8))
      image.convert('CMYK' if kind == 6 else 'L').save(folder / f'{i}.jpg')
  return root


@pytest.mark.slow
def test_a_folder_of_odd_images_trains_and_evaluates(tmp_path):
  folder = str(write_odd_folder(tmp_path / 'odd'))
  config = set_fields(finetune_config.get_config('runlocal'), {
      'data.source': 'folder', 'data.path': folder,
      'val_data.source': 'folder', 'val_data.path': folder,
      'num_train_steps': 2, 'num_devices': 1})
  out = finetune.train(config, str(tmp_path / 'run'))
  assert out['complete'] and np.isfinite(list(out['losses'].values())).all()
  assert out['evals'][2]['count'] == 16 and np.isfinite(out['evals'][2]['loss'])


@pytest.mark.parametrize('name, content', [
    ('zero.png', b''),
    ('notes.jpg', b'These are my notes, not a photo.\n'),
    ('cut.jpg', 'jpeg'),
    ('cut.png', 'png'),
])
def test_an_undecodable_image_is_named(tmp_path, name, content):
  rng = np.random.default_rng(0)
  for i in range(7):
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(
        tmp_path / f'{i}.png')
  if isinstance(content, str):  # a real image cut short
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(
        buffer, format=content)
    content = buffer.getvalue()[:len(buffer.getvalue()) // 2]
  (tmp_path / name).write_bytes(content)
  source = sources.open_source(ml_collections.ConfigDict(
      {'source': 'folder', 'path': str(tmp_path)}))
  expected = (rf'^Could not decode image\(s\) {tmp_path}/{re.escape(name)} of '
              rf'folder {tmp_path}; remove or replace them\.$')
  with pytest.raises(UserError, match=expected):
    stream = streams.train_stream(source, transforms.PRETRAIN, image_size=8,
                                  global_batch_size=8, seed=0, start_step=0)
    next(stream)
  with pytest.raises(UserError, match=expected):
    list(streams.eval_stream(source, image_size=8, global_batch_size=8))


# ----------------------------------------------------------- command lines ---

def _command_line_cases(files, tmp):
  """name -> (script, arguments, the value the error must name)."""
  runlocal = ['--config', 'configs/pretrain.py:runlocal']
  workdir = ['--workdir', str(tmp / 'run')]
  return {
      'mistyped config path': (
          'train.py', ['--config', 'configs/pretrian.py:runlocal', *workdir],
          "--config 'configs/pretrian.py:runlocal': no such file, and no "
          "packaged config named 'pretrian'; packaged configs: demo, export, "),
      'unknown config field': (
          'train.py', [*runlocal, *workdir, '--config.optim.bl=1'],
          "Unknown config field 'bl' in --config.optim.bl=1 (did you mean "
          "'blr'?); fields of config.optim: b1, b2, blr, clip, clip_norm, "
          'min_lr, weight_decay.'),
      'bad :arg': (
          'train.py', ['--config', 'configs/pretrain.py:runlocl', *workdir],
          "--config configs/pretrain.py:runlocl: Unknown config arg 'runlocl' "
          "in 'runlocl'; valid: variant, epochs, runlocal."),
      'unknown field of a default config': (
          'visualize.py', ['--config.init.pth=runs/demo', f'--output={tmp}/x.png'],
          "Unknown config field 'pth' in --config.init.pth=runs/demo (did you "
          "mean 'path'?); fields of config.init: path."),
      'config of another command': (
          'finetune.py', [*runlocal, *workdir],
          'This config is not one for finetune.py: it lacks augment, '),
      'missing --workdir': (
          'train.py', runlocal, '--config and --workdir are required'),
      'unexpected argument': (
          'train.py', [*runlocal, *workdir, 'runs/demo'],
          "unexpected arguments ['runs/demo']; flags look like --name=value"),
      'bad value deep in the config': (
          'train.py', [*runlocal, *workdir, '--config.optim.b2=1.5'],
          'optim.b2=1.5 must be in [0, 1)'),
      'value of the wrong type': (
          'train.py', [*runlocal, *workdir, '--config.batch_size=abc'],
          "flag --config.batch_size=abc: invalid literal for int() with base "
          "10: 'abc' (see --help)."),
      'fine-tuning workdir to visualize': (
          'visualize.py', [f'--config.init.path={files}/finetuning',
                           f'--output={tmp}/x.png'],
          f'fine-tuned classifier mu/8 ({files}/finetuning step 4) has no '
          'DropPos projector'),
      'workdir that is a file': (
          'probe_position.py', ['--config', 'configs/position_probe.py',
                                f'--workdir={files}/notes.txt'],
          f'--workdir {files}/notes.txt is a file; expected a folder'),
      'output under a file': (
          'export.py', [f'--config.init.path={files}/pretraining',
                        f'--output={files}/notes.txt/w.npz'],
          f'--output {files}/notes.txt/w.npz: {files}/notes.txt is a file, '
          'not a folder.'),
  }


@pytest.fixture(scope='module')
def command_lines(files, tmp_path_factory):
  """name -> (case, exit status, stderr) of every case, run a few at a time
  (each spends seconds importing TensorFlow and JAX)."""
  tmp = tmp_path_factory.mktemp('cli')
  cases = _command_line_cases(files, tmp)
  done, running = {}, []

  def finish():
    name, process = running.pop(0)
    _, err = process.communicate(timeout=600)
    done[name] = (cases[name], process.returncode, err)

  for name, (script, args, _) in cases.items():
    if len(running) == 4:
      finish()
    running.append((name, subprocess.Popen(
        [sys.executable, script, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)))
  while running:
    finish()
  return done


COMMAND_LINE_CASES = list(_command_line_cases(pathlib.Path('F'),
                                              pathlib.Path('T')))


@pytest.mark.slow
@pytest.mark.parametrize('name', COMMAND_LINE_CASES)
def test_a_command_line_slip_exits_1_with_one_error_line(command_lines, name):
  (script, _, value), returncode, stderr = command_lines[name]
  assert returncode == 1, stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and value in last, (script, last)


def test_orbax_errors_are_logged_in_one_line():
  """A failed asynchronous save: Orbax logs the exception with its traceback
  before the run policy reports it; the launcher's filter keeps one line."""
  quiet = launch._QuietOrbax()  # pylint: disable=protected-access
  try:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  except OSError:
    exc_info = sys.exc_info()
  orbax = '/site-packages/orbax/checkpoint/_src/async_checkpointer.py'
  record = std_logging.LogRecord('absl', std_logging.ERROR, orbax, 1,
                                 'Save of step %d failed.', (4,), exc_info)
  assert quiet.filter(record)
  assert std_logging.Formatter().format(record) == (
      "Save of step 4 failed. (OSError(28, 'No space left on device'))")
  info = std_logging.LogRecord('absl', std_logging.INFO, orbax, 1, 'Saved.',
                               (), None)
  assert not quiet.filter(info)
  ours = std_logging.LogRecord('absl', std_logging.ERROR, '/x/droppos_jax/a.py',
                               1, 'Bug.', (), exc_info)
  assert quiet.filter(ours) and 'Traceback' in std_logging.Formatter().format(ours)
