"""detkit's pytest plugin (placeholder until the testing issue lands).

Registered through the ``pytest11`` entry point; it must import nothing heavy.
"""
