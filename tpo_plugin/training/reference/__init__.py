"""The reference model: the check that it fits the policy, and its token scores computed once before training."""
