"""Class library: guest facts read through the mounted image (guest.py: confined paths; guestinfo.py: facts)."""
