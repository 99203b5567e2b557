"""Trainers: FlipNet (restore / degrade mode) and its face autoencoders, on one accelerate training core
(:mod:`.core`), with their data (:mod:`.data`). Never imports comfy."""
