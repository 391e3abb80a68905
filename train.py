"""DropPos pre-training; the command lives in droppos_jax/train.py.

`python train.py --help` lists its flags.
"""
from droppos_jax.train import main

if __name__ == '__main__':
  main()
