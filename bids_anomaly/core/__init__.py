"""Core helpers every stage may use: errors and exit codes, atomic writes, configuration,
output names, paths, templates, versions, interruption clean-up, the healthy reference.
"""
