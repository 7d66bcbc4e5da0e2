"""Evidence v2 (issue #15): DPO and three TPO variants along the trade-off, in a pixel-prior and a word-prior world.

``PROTOCOL_v2.md`` is the protocol; ``python -m benchmarks.hallucination_world_v2.run`` runs it.
"""
