"""Every config file and every documented `:arg` loads and validates."""
import glob
import importlib
import os

import pytest

from droppos_jax import settings, sharding, train
from droppos_jax.configs import common
from droppos_jax.configs import pretrain as pretrain_config
from droppos_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_ARGS = [None, 'variant=B/16,epochs=200', 'variant=B/16,epochs=800',
                 'variant=L/16,epochs=800', 'runlocal']


def config_modules():
  return sorted(os.path.basename(p)[:-3] for p in
                glob.glob(os.path.join(REPO, 'configs', '*.py'))
                if not os.path.basename(p).startswith(('_', 'common')))


@pytest.mark.parametrize('name', config_modules())
def test_every_config_file_loads(name):
  module = importlib.import_module(f'droppos_jax.configs.{name}')
  assert module.get_config().to_dict()
  assert 'python ' in module.__doc__  # the docstring carries the command


@pytest.mark.parametrize('arg', PRETRAIN_ARGS)
def test_pretrain_recipes_validate(arg):
  c = pretrain_config.get_config(arg)
  s = train.setup(c, 1_281_167, sharding.make_mesh(c.mesh))
  assert s.total_steps == (5 if arg == 'runlocal' else 312 * c.epochs)


@pytest.mark.parametrize('arg,variant,epochs,warmup', [
    ('variant=B/16,epochs=200', 'B/16', 200, 10),
    ('variant=B/16,epochs=800', 'B/16', 800, 10),
    ('variant=L/16,epochs=800', 'L/16', 800, 40)])
def test_paper_recipes(arg, variant, epochs, warmup):
  c = pretrain_config.get_config(arg)
  assert (c.model.variant, c.epochs, c.warmup_epochs) == (variant, epochs, warmup)
  assert c.batch_size == 4096 and c.optim.blr == 1.5e-4
  assert (c.optim.b1, c.optim.b2, c.optim.weight_decay) == (0.9, 0.95, 0.05)
  assert (c.optim.clip, c.optim.clip_norm) == ('per_tensor', 5.0)
  assert (c.objective.sigma, c.objective.tau) == (1.0, 0.1)
  assert c.objective.sigma_schedule == 'linear_epoch'
  assert (c.masking.strategy, c.masking.mask_ratio, c.masking.pos_drop_ratio) == (
      'random', 0.75, 0.75)
  assert c.data.name == 'imagenet2012' and c.image_size == 224
  s = settings.schedule(c, 1_281_167)
  assert (s.steps_per_epoch, s.total_steps, s.warmup_steps) == (
      312, 312 * epochs, 312 * warmup)
  assert s.peak_lr == 1.5e-4 * 4096 / 256


def test_unknown_arg_is_rejected():
  with pytest.raises(UserError, match="Unknown config arg 'epoch'.*valid: "
                     'variant, epochs, runlocal'):
    pretrain_config.get_config('epoch=800')


def test_args_are_typed_by_their_defaults():
  args = common.parse_arg('epochs=200,runlocal=False,name=x', epochs=800,
                          runlocal=True, name='y', scale=1.5)
  assert (args.epochs, args.runlocal, args.name, args.scale) == (200, False,
                                                                  'x', 1.5)
  assert common.parse_arg('runlocal', runlocal=False).runlocal is True
  assert pretrain_config.get_config('runlocal=False').model.variant == 'B/16'


@pytest.mark.parametrize('arg,message', [
    ('runlocal=maybe', 'is a boolean'), ('epochs=eight', 'must be a int'),
    ('epochs', 'needs a value')])
def test_bad_arg_values_are_refused(arg, message):
  with pytest.raises(UserError, match=message):
    pretrain_config.get_config(arg)
