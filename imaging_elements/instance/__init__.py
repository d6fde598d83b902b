"""Class library: instance validation (instance.py: boot the image under qemu, run the validators in it).

A phase handler: imaging_elements/api.py registers instance.run_phase (phase_handlers.py)."""
