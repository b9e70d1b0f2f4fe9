"""Pallas kernels behind the attention modules (TPU Mosaic, GPU Triton; interpreted on CPU).

flash_attention  softmax attention with log-sum-exp, per-key and full (pair) biases (mhsa and the
                 window mechanisms, impl="pallas")
flash_sigmoid    sigmoid attention, sigma(s + b) with b = -log n (the `sigmoid` zoo entry)
depthwise        a depthwise conv whose program is chosen per platform (not Pallas: shifted sums
                 on CPU, XLA's grouped conv elsewhere), for PVTv2's MLP and the PEG
"""
from vitjax.kernels import common, depthwise, flash_attention, flash_sigmoid  # noqa: F401
