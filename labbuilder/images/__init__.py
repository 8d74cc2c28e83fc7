"""Boot images: downloads and their verification, native builds, role bakes, the cache and the
store; ``images.boot`` turns a lab into its boot images. Imports host, lifecycle, adapters and
the layers below.
"""
