"""Reading and writing checkpoints: safetensors headers, lazy tensor reads, direct I/O, the page
cache, hub downloads and the atomic writer. No math on weights beyond decoding stored formats.
"""
