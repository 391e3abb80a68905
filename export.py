"""Exports weights to the authors'/timm naming; the command lives in droppos_jax/export.py.

`python export.py --help` lists its arguments.
"""
import sys

from droppos_jax.export import main

if __name__ == '__main__':
  sys.exit(main())
