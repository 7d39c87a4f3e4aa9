"""Programs: whole layers (and models) as graphs of named tensors and ops, planned as one.

``layers.build_layer`` makes a layer's forward program, ``autodiff.training`` adds its
backward pass, ``strategies.place`` lays a named strategy (``fsdp=x,tp=y``) on it, and
``evaluate.evaluate`` turns a placement into a ``ProgramPlan`` with every number.
"""
