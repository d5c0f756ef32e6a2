"""preprocess layer."""
