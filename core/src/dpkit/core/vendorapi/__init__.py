"""The vendor API: what a vendor package implements and hands the core."""
