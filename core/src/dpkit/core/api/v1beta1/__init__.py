"""Generated from proto/deviceplugin/v1beta1/api.proto by scripts/gen_protos.py."""
