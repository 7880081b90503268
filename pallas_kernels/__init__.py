"""Pallas kernels, one file each: kernel body, jitted wrapper, float32 reference."""
