"""The XML libvirt reads: domains (lab nodes, bake guests, probe guests) and networks, rendered
by one jinja2 environment with XML autoescaping from templates shipped as data
(``labbuilder/libvirtxml/templates/`` and the ``networks/`` data folder), and the metadata
namespace that marks what labbuilder owns. Pure text; imports labbuilder.common only.
"""
