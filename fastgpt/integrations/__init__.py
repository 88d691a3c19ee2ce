"""Drop-in patches that put fastgpt's kernels inside other libraries' models.

Each submodule imports its library; this package imports none of them, so ``import fastgpt`` stays free
of ``transformers``.
"""
