r"""The paper's position-awareness analysis (arXiv 2309.03576, §4.3) as one
command: encoders pre-trained (or randomly initialised) and fine-tuned, each
probed for patch positions with 75 % of their PEs dropped, on frozen
features; one table and one figure.

  python position_awareness.py --config configs/position_awareness.py \
      --workdir runs/awareness
  python position_awareness.py --config configs/position_awareness.py \
      --workdir runs/awareness2 --config.encoders.droppos.pretrained=runs/demo

Pre-training and fine-tuning run here unless `encoders.<name>.pretrained` or
`.finetuned` names an existing run or file; every given path is checked
before anything is written. Writes position_awareness.json, the figure
position_awareness.png and each probe's heat-map under probes/.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Optional

from absl import logging
from etils import epath
import jax
from matplotlib.figure import Figure

from droppos_jax import finetune, launch, objectives, pictures, sharding, train
from droppos_jax.errors import UserError, writing
from droppos_jax.evaluators import position_probe
from droppos_jax.models import weights

STAGES = ('pre-trained', 'fine-tuned')


@dataclasses.dataclass
class Encoder:
  """One encoder of the analysis: where its pre-trained weights come from
  (a path, '' for a random initialisation, or a config to pre-train with
  here) and its fine-tuned ones (a path, or fine-tune here)."""
  name: str
  pretrained: str
  pretrain_config: Optional[Any]
  finetuned: str
  title: str


def _checked(path: str, field: str, kinds: tuple[str, ...]) -> str:
  """`path` if it reads as weights of one of `kinds`, else one line."""
  w = weights.read(path, what=field)
  if w.kind not in kinds:
    wanted = ' or '.join(weights.KIND_NAMES[k] for k in kinds)
    raise UserError(f'{field}={path} is a {weights.KIND_NAMES[w.kind]}; '
                    f'expected a {wanted}.')
  return path


def plan(config) -> list[Encoder]:
  """Every encoder's sources, checked: given runs exist and are of the
  kind their stage needs; configs to run load."""
  unknown = [n for n in config.order if n not in config.encoders]
  if unknown or not config.order:
    raise UserError(f'order={tuple(config.order)!r} must name encoders, at '
                    f'least one; defined: {", ".join(config.encoders)}.')
  out = []
  for name in config.order:
    e, field = config.encoders[name], f'encoders.{name}'
    pre_cfg = launch.load_config(e.pretrain_config) if e.pretrain_config else None
    objective = pre_cfg and objectives.objective(pre_cfg)
    if e.pretrained:
      kinds = ((pre_cfg.objective.name,) if pre_cfg else tuple(
          objectives.OBJECTIVES))
      _checked(e.pretrained, f'{field}.pretrained', kinds)
    if e.finetuned:
      _checked(e.finetuned, f'{field}.finetuned', ('classifier',))
    title = objective.title if objective else (
        'random init' if not e.pretrained else name)
    out.append(Encoder(name, e.pretrained, None if e.pretrained else pre_cfg,
                       e.finetuned, title))
  return out


def _pretrain(e: Encoder, workdir: epath.Path) -> str:
  if e.pretrained or e.pretrain_config is None:
    return e.pretrained
  run = workdir / f'pretrain_{e.name}'
  train.train(e.pretrain_config, str(run))
  return str(run)


def _finetune(e: Encoder, pretrained: str, config, workdir: epath.Path) -> str:
  if e.finetuned:
    return e.finetuned
  c = launch.load_config(config.finetune_config)
  c.init.path = pretrained
  run = workdir / f'finetune_{e.name}'
  finetune.train(c, str(run))
  return str(run)


def _probe(path: str, region: str, split: str, config, mesh,
           out: epath.Path):
  c = config.probe.copy_and_resolve_references()
  c.init.path = path
  c.eval_data.split = split
  r = position_probe.run_probe(c, str(out), mesh)
  logging.info('%s on the %s: position top-1 %.1f%%, grid distance %.2f.',
               r['init'], region, 100 * r['acc'], r['dist_err'])
  return {k: r[k] for k in ('acc', 'dist_err', 'chance', 'grid', 'init')}


def analyse(config, workdir: str) -> dict[str, Any]:
  """Runs the analysis; returns {'rows': [...], 'seconds': {...}}."""
  encoders = plan(config)
  regions = dict(config.regions)
  if not regions:
    raise UserError('regions is empty: name at least one (split: name).')
  root = epath.Path(workdir)
  mesh = sharding.make_mesh(num_devices=config.probe.num_devices)
  seconds, rows = {}, []
  for e in encoders:
    start = time.perf_counter()
    pretrained = _pretrain(e, root)
    seconds[f'pretrain {e.name}'] = time.perf_counter() - start
    start = time.perf_counter()
    finetuned = _finetune(e, pretrained, config, root)
    seconds[f'finetune {e.name}'] = time.perf_counter() - start
    for stage, path in zip(STAGES, (pretrained, finetuned)):
      start = time.perf_counter()
      row = {'encoder': e.title, 'path': path or 'random init',
             'stage': stage if path else 'as initialised'}
      for split, region in regions.items():
        row[region] = _probe(path, region, split, config, mesh,
                             root / 'probes' /
                             f'{e.name}_{stage}_{split}')
      rows.append(row)
      seconds[f'probe {e.name} {stage}'] = time.perf_counter() - start
  results = {'rows': rows, 'seconds': seconds, 'regions': regions}
  if jax.process_index() == 0:
    path = root / 'position_awareness.json'
    with writing(path):
      path.write_text(json.dumps({'results': results,
                                  'config': config.to_dict()}, indent=1))
    pictures.save_figure(draw(results), root / 'position_awareness.png',
                         dpi=120)
  print(table(results))
  return results


def table(results) -> str:
  """The results as a Markdown table: top-1 and grid-distance error per
  region, with chance."""
  regions = list(results['regions'].values())
  head = ['encoder', 'stage'] + [f'{r}: top-1 (distance)' for r in regions]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in results['rows']:
    cells = [row['encoder'], row['stage']] + [
        f'{100 * row[r]["acc"]:.1f} % ({row[r]["dist_err"]:.2f})'
        for r in regions]
    lines.append('| ' + ' | '.join(cells) + ' |')
  first = results['rows'][0][regions[0]]
  lines.append(f'\nChance: {100 * first["chance"]:.2f} % top-1 on the '
               f'{"x".join(map(str, first["grid"]))} grid.')
  return '\n'.join(lines)


def draw(results) -> Figure:
  """Grouped bars: position top-1 per encoder and stage, one bar per
  region, chance as a dashed line."""
  rows, regions = results['rows'], list(results['regions'].values())
  fig = Figure(figsize=(1.6 + 1.3 * len(rows), 4.2))
  ax = fig.add_subplot()
  width = 0.8 / len(regions)
  for i, region in enumerate(regions):
    xs = [j + (i - (len(regions) - 1) / 2) * width for j in range(len(rows))]
    bars = ax.bar(xs, [100 * r[region]['acc'] for r in rows], width,
                  label=region)
    ax.bar_label(bars, fmt='%.1f', fontsize=7)
  chance = 100 * rows[0][regions[0]]['chance']
  ax.axhline(chance, color='k', linestyle='--', linewidth=1,
             label=f'chance ({chance:.2f} %)')
  ax.set_xticks(range(len(rows)), [f'{r["encoder"]}\n{r["stage"]}'
                                   for r in rows], fontsize=8)
  ax.set_ylabel('position top-1 of PE-dropped patches (%)')
  ax.set_title('Linear position probe on frozen features, 75 % of PEs '
               'dropped (arXiv 2309.03576, §4.3)', fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def main():
  launch.run(analyse, config_kind='position_awareness',
             output_help='Folder for the runs, probes, table and figure '
             '(local or gs://).')


if __name__ == '__main__':
  main()
