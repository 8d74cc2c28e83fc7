"""labbuilder: a virtualised OpenStack lab on one KVM/libvirt host, installed by the guide."""

__version__ = "0.1.0"
