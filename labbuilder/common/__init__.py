"""Shared basics every layer may use: errors, file locks, paths, data folders, sizes, TOML readers,
quoting filters. Imports nothing else of labbuilder.
"""
