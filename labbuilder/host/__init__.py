"""What this host offers a lab: its facts, the acceleration probe, its cached decision and its
findings. Imports lifecycle (state files), adapters and the layers below.
"""
