"""Stage two of LP-FT: fine-tune the last backbone blocks and the probe-initialised head in Lightning,
training on trunk activations cached in RAM."""
