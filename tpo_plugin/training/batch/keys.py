"""The keys of the noise-key loop and the batch fields TPO adds, in one place.

A training sample's noise is keyed by the optimizer step it trains at: the sampler pairs each index with that
step (``STEP_FIELD``, :mod:`.step_keys`), the collator corrupts the batch's images with the step's noise in the
loader's workers and names the key it used (``NOISE_KEY``, :mod:`.collator`), and the trainer takes those inputs
only when the key is the one its step needs. Evaluation, the reference pass and the token view use
``EVAL_STEP_KEY``; ``tpo_noise_per: sample`` uses ``SAMPLE_KEY`` everywhere.
"""

STEP_FIELD = "tpo_step"  # a training sample's field: the optimizer step its batch trains at
EVAL_STEP_KEY = -1  # every evaluation uses the same noise, so evaluations at different steps compare
SAMPLE_KEY = -2  # with `tpo_noise_per: sample` every step and evaluation uses this key: one noise per image

PAIR_KEY = "tpo_pair_key"  # dataset column (and batch key) naming each pair "<split>/<row>" (tpo_precompute_ref)
PAIR_IMAGES_KEY = "tpo_images"  # batch key under which each pair's loaded images reach the trainer
PAIR_VIDEOS_KEY = "tpo_videos"  # and each pair's videos, as the frames the model sees
CORRUPTED_INPUTS_KEY = "tpo_corrupted_inputs"  # the corrupted images' multimodal tensors, built by the collator
NOISE_KEY = "tpo_noise_key"  # the noise key they were built with (None: not built by the collator)
