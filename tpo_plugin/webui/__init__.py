"""The TPO stage in LLaMA-Factory's web UI (LlamaBoard): its settings panel, labels, arguments and checks."""
