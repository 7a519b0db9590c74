"""The mode codes the fused kernels and their drivers share (methods/fused.py,
methods/_fused_kernels.py): a module of their own, so that neither imports the other's.
"""

# Per-model sparsification, in the order the torch path applies it.
KEEP, ZERO, TRIM, DROP = 0, 1, 2, 3  # keep τᵢ, zero it, TIES top-k trim, DARE Bernoulli drop
SCALE_NONE, SCALE_DIV, SCALE_MUL = 0, 1, 2  # rescale: none, inverse (÷ density), l1 (× factor)
SUM, MASS, FREQUENCY = 0, 1, 2  # no election, or the TIES sign election by mass or frequency
