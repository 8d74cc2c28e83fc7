"""The data model: a lab, the host's facts, a plan, the guide's facts and addressing, the probe's
findings. Frozen dataclasses and pure functions; imports only labbuilder.common.
"""
