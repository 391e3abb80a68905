"""Pictures of a DropPos checkpoint's position predictions; the command lives in droppos_jax/visualize.py.

`python visualize.py --help` lists its flags.
"""
from droppos_jax import cli  # stdlib only: SIGTERM is taken over first

if __name__ == '__main__':
  cli.visualize()
