"""dpkit vendor package: cex."""
