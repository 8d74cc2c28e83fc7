"""Installing a recipe into a lab that is up: the engine that runs rendered steps with run-once
markers, its reports, and the code that runs in the guests (``install.guest``). Imports adapters
and the layers below.
"""
