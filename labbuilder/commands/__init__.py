"""The CLI's subcommands, one module per area; ``labbuilder.cli`` wires them into one parser.

Each module has ``register(subparsers)``; handlers take the parsed arguments and a console and
return the exit code. They only parse, call library functions and print.
"""
