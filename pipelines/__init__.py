"""Inference algorithms in plain torch/diffusers. Never imports comfy; progress/interrupt come in as callbacks."""
