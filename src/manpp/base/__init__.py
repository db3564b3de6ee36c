"""The bottom layer: what every other layer may use and that uses nothing of manpp above it.

errors (ManppError), settings (a setting declared once, with its rule), registry (objectives, methods,
tasks and backbone families by name), safeio (atomic writes), extras (optional dependencies), console
(stdout/stderr that survive a closed pipe), distributed (torchrun's process group and collectives) and
checkpoint (checkpoint files, their checksum and the run identity).
"""
