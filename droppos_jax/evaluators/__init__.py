"""Evaluators of frozen or in-training encoders: position probing (paper
§4.3) and the online evaluator (k-NN, held-out position accuracy) that
pre-training calls every few steps. They read data through
droppos_jax.data.device.eval_batches."""
