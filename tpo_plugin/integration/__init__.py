"""How the plugin enters LLaMA-Factory: the start-up hook and the patches of LLaMA-Factory's modules."""
