"""The trainable modules (LoRA targets, BoostHub, face embedder + adapter), their losses and checkpoint formats.
Never imports comfy."""
