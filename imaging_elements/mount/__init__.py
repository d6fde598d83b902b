"""Class library: mounting an image (disk.py: exports, partitions, filesystems; fstab.py: the guest's fstab)."""
