"""Install recipes: their model, their folders read into it, rendering a recipe for a lab (pure),
its sizes and its coverage of the guide. Imports the model and common; no adapter.
"""
