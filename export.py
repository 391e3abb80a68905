"""Exports weights to the authors'/timm naming; the command lives in droppos_jax/export.py.

`python export.py --help` lists its flags.
"""
from droppos_jax import cli  # stdlib only: SIGTERM is taken over first

if __name__ == '__main__':
  cli.export()
