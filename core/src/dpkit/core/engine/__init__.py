"""The engine: serves devices to the kubelet and keeps them live."""
