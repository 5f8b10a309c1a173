"""End-to-end jobs behind the CLI: retrofit a model from a recipe, export it, run the demo, compare.

Each job goes down the layers (recipe -> model loading -> ``apply_dms`` -> trainer -> adapters ->
export) and returns a JSON-able summary; ``modelopt_dms.cli`` only parses arguments and calls them.
"""
