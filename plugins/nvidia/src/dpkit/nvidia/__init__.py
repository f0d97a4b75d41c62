"""dpkit vendor package: nvidia."""
