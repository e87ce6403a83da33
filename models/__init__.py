"""gpuyard package."""
