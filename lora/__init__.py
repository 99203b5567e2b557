"""Everything trainable (LoRA targets, BoostHub, face embedder, DR encoder, identity mask), training entry points
and checkpoint formats. Never imports comfy."""
