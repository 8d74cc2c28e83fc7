"""What a class gives its students and its trainer: handouts (Markdown and PDF) with their lab's
addresses, passwords and connection commands, the ssh_config and known_hosts that reach their
own lab through the class's SSH entry on the host, that entry's own configuration, and the
trainer's board as a web application (``board``: Flask routes over a ``BoardSource``). Pure
rendering from jinja2 templates (``templates/``): nothing here opens a socket or runs a
program; imports lab, recipe, model and common.
"""
