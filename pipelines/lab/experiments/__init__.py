"""One experiment per adapter method: `<method>.py` defines its settings and `run`, and registers them.

`pipelines.lab` imports every module here when it is imported; modules whose name starts with `_` are helpers.
"""
