"""Fine-tuning and linear probing; the command lives in droppos_jax/finetune.py.

`python finetune.py --help` lists its flags.
"""
from droppos_jax import cli  # stdlib only: SIGTERM is taken over first

if __name__ == '__main__':
  cli.finetune()
