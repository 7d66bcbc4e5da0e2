"""The controlled-world experiments (issues #15, #19): Evidence v2 (DPO and three TPO variants along the trade-off,
in a pixel-prior and a word-prior world), its pilots, the stability checks and the trajectory diagnosis.

Each experiment's protocol is frozen in ``checks/<CHECK>.json``; ``python -m benchmarks.hallucination_world_v2.run
CHECK`` runs it (``benchmarks/README.md`` indexes them).
"""
