"""dpkit.core: the device-plugin engine."""
