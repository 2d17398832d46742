"""Models from the Hugging Face hub: catalog, resumable verified downloads, preflight, conversion into bundles.

The service to use is `owl_desktop.hub.manager.ModelManager` (its docstring lists the API). Plain Python, no Qt.
"""
