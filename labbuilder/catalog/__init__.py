"""The image catalog: what images exist and how to get them (TOML files in images/). Pure reading;
imports labbuilder.common and labbuilder.model.lab.
"""
