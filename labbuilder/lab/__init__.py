"""Lab files and plans: reading a lab file, its checks and references, the planner (a pure
function) and the plan's views. Imports recipe, catalog, model and common; no adapter.
"""
