"""Tools: the CLI, diagnostics, the demo and the kubelet emulator."""
