"""Code that runs inside the lab's nodes, shipped to them as files: the fast path's API process,
the warm Python, and what ``verify`` reads of a cloud. Standard library and the guests'
openstacksdk only; imports nothing of labbuilder.
"""

from pathlib import Path

GUEST_API_SOURCE = Path(__file__).with_name("guestapi.py")  # the fast path's API process
WARM_PYTHON_SOURCE = Path(__file__).with_name("warmpython.py")  # a node's warm Python
CLOUD_FACTS_SOURCE = Path(__file__).with_name("cloudfacts.py")  # what Tempest needs of a cloud
