"""The input pipeline, by job.

- sources.py: `open_source(cfg)` opens a data config once (no TensorFlow).
- demo.py: the offline demo photos.
- transforms.py, randaugment.py: per-example decoding and augmentation (TF).
- streams.py: resumable tf.data streams of host batches (global order).
- device.py: host batches -> normalised global jax.Arrays.
"""
