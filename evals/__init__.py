"""OOD-MMSafe-style evaluation (imported as ``caspo_jax.evals``).

Modules, one job each:

* ``metrics``: R/S/E maths (judge-averaged X_A, X_0 two ways, 0/1/2 shares, deltas).
* ``modes``: the standard / malicious / constitution / caption prompts.
* ``generators``: the ``Generator`` protocol, the OpenAI-endpoint generator, the paper's
  sampling preset, and ``LocalGenerator`` over the in-process JAX sampler or vLLM engine.
* ``runner``: the resumable generate-then-judge loop over a ``ResultsStore`` (``store``).
* ``judging``: judge functions (R/S/E rubric, SIUO safe/effective, MSSBench 4-class).
* ``siuo``, ``mssbench``: benchmark adapters over their published JSON layouts.
* ``suites``: benchmarks as work items, summaries rebuilt from stored results.
* ``report``: markdown tables, CSV, PNG figures. ``token_shift``: figure 5's analysis;
  ``shift_scoring``: the same responses scored by two checkpoints (``--token-shift``).
* ``cli``: ``caspo eval``.

The package itself imports none of them, so ``import caspo_jax.evals`` stays light.
"""
