"""The training run of ``stage: tpo``, by concern; imports run one way, bottom to top:

- ``batch/``: a step's inputs, the whole noise-key loop (keys, sampler, collator, the one place that draws noise)
  and the reuse of image encodings within a step;
- ``checks/``: what is refused before the model loads (data, templates, families);
- ``run/``: the run around the steps (settings and resume, stop signals, checkpoints, the stability monitor);
- ``reference/``: the reference model (its check, and the precomputed reference scores with their pass);
- ``diagnostics/``: the per-token view and the token log;
- ``trainer.py``: the passes, the loss and the metrics; ``workflow.py``: the one run builder and ``run_tpo``.
"""
