"""Support: configuration, logging and file handling shared by every part."""
