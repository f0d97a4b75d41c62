"""Generated kubelet API stubs (do not edit; run `hatch run protos`)."""
