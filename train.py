"""DropPos pre-training; the command lives in droppos_jax/train.py.

`python train.py --help` lists its flags.
"""
from droppos_jax import cli  # stdlib only: SIGTERM is taken over first

if __name__ == '__main__':
  cli.train()
