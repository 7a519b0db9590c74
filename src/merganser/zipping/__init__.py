"""Models from different initialisations: feature matching, alignment (Git Re-Basin), ZipIt! and
the least-squares refit.
"""
