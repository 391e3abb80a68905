"""The paper's position-awareness analysis (§4.3) as one command; it lives in droppos_jax/position_awareness.py.

`python position_awareness.py --help` lists its flags.
"""
from droppos_jax import cli  # stdlib only: SIGTERM is taken over first

if __name__ == '__main__':
  cli.position_awareness()
