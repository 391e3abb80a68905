r"""The paper's position-awareness analysis (arXiv 2309.03576, §4.3) on the demo photos.

  python position_awareness.py --config configs/position_awareness.py \
      --workdir runs/awareness

For each encoder below, pre-trained and fine-tuned, a linear position probe
on frozen features with 75 % of the visible patches' PEs dropped (the
paper's probe): one table and one figure. The paper probes MAE and MoCo v3
ViT-B/16 on ImageNet and finds the fine-tuned encoders place patches far
better than the pre-trained ones.

`encoders.<name>`: `pretrain_config` (a config to pre-train with here, ''
for a random initialisation), or `pretrained` (an existing pre-training run
or weights file, which skips that stage); `finetuned` (an existing
fine-tuned run or file), else fine-tuning runs here with `finetune_config`
from the pre-trained weights. Runs made here go to <workdir>/<stage>_<name>
and resume like any other run.
"""
import ml_collections

from droppos_jax.configs import position_probe


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  encoder = lambda config: ml_collections.ConfigDict(dict(
      pretrain_config=config, pretrained='', finetuned=''))
  c.encoders = ml_collections.ConfigDict(dict(
      random=encoder(''), droppos=encoder('demo'), mae=encoder('mae_demo')))
  c.order = ('random', 'droppos', 'mae')   # the table's rows: encoders' names
  c.finetune_config = 'finetune:demo'
  # The probe (configs/position_probe.py): 75 % of the patches masked and
  # 75 % of the visible ones without PE, as the paper's probe; scored on
  # fresh crops of the photos' training region and on the held-out band.
  c.probe = position_probe.get_config()
  c.probe.image_size = 32         # the demo's; also the random encoder's
  # eval_data.split -> its name in the table (the demo's 'val' is the band).
  c.regions = ml_collections.ConfigDict(dict(
      train='training region', val='held-out band'))
  return c
