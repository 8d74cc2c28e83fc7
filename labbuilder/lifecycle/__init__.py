"""A lab's life on the host once planned: its state directory and the host's registry, the texts
libvirt and cloud-init read, readiness, status, snapshots and teardown. Imports adapters and the
layers below.
"""
