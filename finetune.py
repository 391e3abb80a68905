"""Fine-tuning and linear probing; the command lives in droppos_jax/finetune.py.

`python finetune.py --help` lists its flags.
"""
from droppos_jax.finetune import main

if __name__ == '__main__':
  main()
