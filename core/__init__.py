"""gpuyard's ground floor: settings, errors, atomic writes, exit codes, job states and file names.

Imports no framework and nothing of ``models``, ``worker`` or ``service``; everything above imports it.
"""
