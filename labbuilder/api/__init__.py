"""What the CLI does, as functions: plan, up, install, status, down. Orchestrates every layer
below; imported only by labbuilder.cli.main.
"""
