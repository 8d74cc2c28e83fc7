"""Adapters: one module per outside system (libvirt, the host's kernel and files, SSH, ...).

Side effects live here and nowhere else; each adapter returns model objects or small
dataclasses and translates the outside system's errors into ``labbuilder.common.errors``.
"""
