"""Running models: evaluation on tasks and JSONL, calibration statistics for data-aware methods,
result tables, and the built-in zoo.
"""
