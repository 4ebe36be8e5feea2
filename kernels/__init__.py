"""Triton kernels and their launchers (installed as mkfast.kernels).

No autograd and no nn.Module here: a launcher checks nothing, allocates the
outputs, picks the grid and launches. Input checks live in mkfast.ops.
"""
