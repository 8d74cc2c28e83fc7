"""Proving a lab's cloud with OpenStack's own integration tests (Tempest): what a recipe says
of Tempest (``spec``: its version, suites, expected skips), the ``tempest.conf`` made from a
lab's plan, secrets and what its cloud holds (``config``, pure), and Tempest's results read
back into reports (``results``: one JUnit case per test, a summary per service).

Owns no side effect but reading a recipe's ``verify.toml`` and writing report files it is
given. May import ``labbuilder.lifecycle`` (state files), ``labbuilder.recipe``,
``labbuilder.model`` and ``labbuilder.common``; running Tempest is
``labbuilder.adapters.tempest``'s.
"""
