"""Position probing of a frozen ViT; the command lives in droppos_jax/probe_position.py.

`python probe_position.py --help` lists its flags.
"""
from droppos_jax import cli  # stdlib only: SIGTERM is taken over first

if __name__ == '__main__':
  cli.probe_position()
