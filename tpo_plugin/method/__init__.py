"""The method (docs/method.md) as pure functions of tensors and images: the noise schedule, corrupting one image,
and the objective (visual score, token weight, margin, loss). Nothing here imports LLaMA-Factory."""
