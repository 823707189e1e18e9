"""The private core every front end feeds.

Imports run one way: front ends (``functional``, ``flow``, ``module``) -> rules ->
core -> ``engine``; nothing here imports a front end or a rule.

* :mod:`.flat` — flat views of a named parameter dict;
* :mod:`.checks` — every argument check, in one place;
* :mod:`.engine` — VJPs / HVPs of plain callables, one at a time or batched with vmap;
* :mod:`.replay` — one step's inner loss, replayed with the same RNG state and without
  updating the buffers it mutates a second time;
* :mod:`.steps` — step maps, and the one place that turns a learning rate, a torchopt
  ``GradientTransformation`` or a ``torch.optim`` optimizer into one;
* :mod:`.record` — what a rule needs (:class:`~.record.Needs`), the record protocol rules
  consume, and the record the inner loop fills;
* :mod:`.loop` — THE inner loop (graph-free with snapshots, or unrolled);
* :mod:`.link` — the one autograd node that links a record to the initial parameters;
* :mod:`.ode` — ODE options and checked torchdiffeq calls.
"""
