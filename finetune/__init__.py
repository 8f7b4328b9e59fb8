"""Stage two of LP-FT: fine-tune the tail and the probe-initialised head in Lightning on trunk activations in RAM."""
