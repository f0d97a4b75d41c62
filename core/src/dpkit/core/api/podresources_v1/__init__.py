"""Generated from proto/podresources/v1/api.proto by scripts/gen_protos.py."""
