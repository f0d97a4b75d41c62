"""dpkit vendor package: sfc."""
