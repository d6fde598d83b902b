"""Class library: converting images (qemuimg.py: confined qemu-img; bootdisk.py: boot disks)."""
