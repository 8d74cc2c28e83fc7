"""What a class gives its students: handouts (Markdown) with their lab's addresses, passwords and
connection commands, the ssh_config and known_hosts that reach their own lab through the class's
SSH entry on the host, and that entry's own configuration. Pure rendering from jinja2 templates
(``templates/``); imports lab, recipe, model and common.
"""
