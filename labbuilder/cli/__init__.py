"""The command line: argument parsing, subcommands, progress on the terminal and in logs, exit
codes. Imports labbuilder.api.facade and the layers below.
"""
