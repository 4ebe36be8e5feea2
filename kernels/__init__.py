"""Triton kernels and their launchers (installed as mkfast.kernels).

No autograd and no nn.Module here: a launcher checks nothing, allocates the
outputs, picks the grid and launches. Input checks live in mkfast.ops.
"""


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1), as Triton itself reads it.

    Asked of Triton, not of mkfast: this package imports nothing of mkfast (the ops call it).
    """
    try:
        from triton import knobs
    except ImportError:  # no Triton, or one older than its knobs (3.4)
        return False
    return bool(knobs.runtime.interpret)


def _patch_triton_interpreter_index() -> None:
    """Let Triton < 3.7's interpreter use a scalar tensor as a loop bound under NumPy >= 2.4.

    That interpreter holds a scalar as a shape-(1,) array and defines ``tensor.__index__``
    as ``int(data)``, a TypeError since NumPy 2.4 ("only 0-dimensional arrays can be
    converted to Python scalars"), so every kernel looping over runtime bounds fails under
    TRITON_INTERPRET=1 (triton 3.6 is what torch 2.11 ships). Triton 3.7+ squeezes the
    array first; this does the same for older ones, and only when the interpreter is on.
    """
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return
    if not interpreter_enabled():
        return
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)  # a private name: absent means nothing to fix
    if original is None or getattr(original, "_mkfast_index_fix", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._mkfast_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


_patch_triton_interpreter_index()
