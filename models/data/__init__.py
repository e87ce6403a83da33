"""HDF5 data sets: checks (in-process and sandboxed), summaries and readers."""
