"""Integrations: what the node learns from the plugin besides the kubelet (CDI, labels, metrics, pod view)."""
