"""dpkit vendor package: kvm_vfio."""
