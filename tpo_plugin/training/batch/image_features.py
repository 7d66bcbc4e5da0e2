"""Encode each image (and video) once per training step instead of once per row and forward (docs/method.md §10).

A TPO step puts every image of a pair through the vision tower eight times if nothing is shared: in the
chosen and in the rejected row, clean and corrupted, for the policy and for the reference model. For a
Qwen2-VL-2B-sized model one 448×448 image costs about as much in the vision tower as a whole ~480-token row
in the language model, so these encodings are a large part of a step. Yet the chosen and the rejected row
carry the same image, and while the vision tower and projector are frozen (LLaMA-Factory's default) the
policy and the reference model encode an image identically, and no gradient needs to run back through the
vision tower.

``ImageFeatureCache.encode_once`` wraps the forwards the trainer runs: for their duration the model's
``get_image_features`` splits the call's image tensors into the equal blocks the trainer says they consist
of (``[P, P]`` for one pass, ``[P, P, Q, Q]`` for the clean and corrupted passes joined), encodes only the
blocks it has not seen this step, and joins the features back in the call's order. A frozen vision path
encodes without a graph, also where nothing is reused (under ZeRO-3 or FSDP, or for other families).
Reuse is checked, never assumed: a block is reused only when all its input tensors equal those of the
encoded block exactly, and only when the encoded features carry a graph exactly when a fresh encoding
would. Reusing one block's features twice in a forward with a trainable vision tower is still exact:
autograd sums both uses.

Video tensors are blocks of the same kind: Qwen3-VL encodes them through ``get_image_features``, Qwen2-VL and
Qwen2.5-VL through ``get_video_features``, which is wrapped the same way; other families encode videos as they come.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Any

import torch


# Families whose ``get_image_features`` takes image tensors stacked along dim 0 (pixels, tiles or patches, grids,
# sizes) and whose forward reads only ``pooler_output`` (and Qwen3-VL's ``deepstack_features``) from it. Each is
# trained in ``tests/test_families.py``, which counts the encodings.
SUPPORTED_MODEL_TYPES = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_vl_moe",
    "llava",
    "llava_next",
    "internvl",
    "gemma3",
    "paligemma",
    "mistral3",
    "glm4v",
    "glm4v_moe",
    "qwen3_5",
    "video_llava",
    "llava_next_video",
)


# Families whose ``get_video_features`` runs the vision tower itself (Qwen3-VL's calls ``get_image_features``, so its
# videos are reused through that): their video tensors are split into blocks and reused the same way.
OWN_VIDEO_ENCODER_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclass
class _EncodedBlock:
    inputs: list[torch.Tensor]
    features: Any
    has_graph: bool


def image_feature_owner(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose forward calls ``self.get_image_features``: the one holding ``language_model``."""
    for module in model.modules():
        if "language_model" in module._modules and callable(getattr(module, "get_image_features", None)):
            return module
    return None


def vision_path_is_frozen(owner: torch.nn.Module) -> bool:
    """Whether no parameter outside the language model (vision tower, projector, adapters there) trains."""
    return not any(
        param.requires_grad
        for name, child in owner.named_children()
        if name != "language_model"
        for param in child.parameters()
    )


def join_block_features(blocks: list[Any]) -> Any:
    """Per-block outputs of ``get_image_features`` as the output of one call over all blocks, in order.

    ``pooler_output`` lists features per image (a tuple or list of tensors, or one tensor stacked along
    dim 0); Qwen3-VL's ``deepstack_features`` lists per layer a tensor of all image tokens along dim 0.
    """
    first = blocks[0]
    joined_fields = {"pooler_output": _join_images([block.pooler_output for block in blocks])}
    if getattr(first, "deepstack_features", None) is not None:
        per_layer = zip(*(block.deepstack_features for block in blocks), strict=True)
        joined_fields["deepstack_features"] = [torch.cat(layer) for layer in per_layer]
    # LLaVA sets ``pooler_output`` as a plain attribute on an output type that lacks the field (Pixtral's
    # ``BaseModelOutput``): such fields are set the same way here.
    declared = {field.name for field in fields(type(first))}
    joined = type(first)(**{name: value for name, value in joined_fields.items() if name in declared})
    for name, value in joined_fields.items():
        if name not in declared:
            setattr(joined, name, value)
    return joined


def _join_images(features: list[Any]) -> Any:
    if isinstance(features[0], torch.Tensor):
        return torch.cat(features)
    return [image for block in features for image in block]


def _split_call(args: tuple, kwargs: dict, num_blocks: int) -> list[tuple[tuple, dict]] | None:
    """The call's arguments for each of ``num_blocks`` equal blocks along dim 0, or ``None`` if they don't split."""
    tensors = _tensors((args, kwargs))
    if not tensors or any(tensor.size(0) % num_blocks for tensor in tensors):
        return None

    def block(value: Any, index: int) -> Any:
        return value.chunk(num_blocks)[index] if isinstance(value, torch.Tensor) else value

    calls = [
        (tuple(block(value, index) for value in args), {key: block(value, index) for key, value in kwargs.items()})
        for index in range(num_blocks)
    ]
    # Grids and sizes must agree across blocks, or the pixel blocks would not start at image boundaries.
    layouts = [[tensor for tensor in _tensors(call) if not tensor.is_floating_point()] for call in calls]
    if any(not _all_equal(layout, layouts[0]) for layout in layouts[1:]):
        return None
    return calls


def _tensors(call: tuple[tuple, dict]) -> list[torch.Tensor]:
    return [value for value in (*call[0], *call[1].values()) if isinstance(value, torch.Tensor)]


def _all_equal(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(first, second, strict=True)
    )


class ImageFeatureCache:
    """Image features encoded during one training step, reused by the step's later forwards."""

    def __init__(self, reuse_encodings: bool, share_with_reference: bool):
        self.reuse_encodings = reuse_encodings
        self.share_with_reference = share_with_reference
        self._blocks: dict[str, list[_EncodedBlock]] = {}

    def clear(self) -> None:
        self._blocks.clear()

    def encode_once(self, model: torch.nn.Module, num_blocks: int, reference: bool):
        """Context for one forward of ``model`` whose image tensors are ``num_blocks`` equal blocks along dim 0.

        ``reference`` marks a forward of the reference model (a separate model, or the policy with its
        adapter disabled); its features come from the policy's only if ``share_with_reference``. Without
        ``reuse_encodings``, or for another family, every call is encoded as it comes, a frozen vision path
        still without a graph.
        """
        owner = image_feature_owner(model)
        if owner is None:
            return nullcontext()
        reuse = self.reuse_encodings and owner.config.model_type in SUPPORTED_MODEL_TYPES
        scope = "reference" if reference and not self.share_with_reference else "policy"
        return self._patched(owner, num_blocks if reuse else None, scope, trainable=not vision_path_is_frozen(owner))

    @contextmanager
    def _patched(self, owner: torch.nn.Module, num_blocks: int | None, scope: str, trainable: bool):
        known = self._blocks.setdefault(scope, [])  # images and videos alike: a block matches only equal tensors
        names = ["get_image_features"]
        if owner.config.model_type in OWN_VIDEO_ENCODER_MODEL_TYPES:
            names.append("get_video_features")
        for name in names:  # an instance attribute shadows the class's method
            setattr(owner, name, self._encoding_once(getattr(owner, name), known, num_blocks, trainable))
        try:
            yield
        finally:
            for name in names:
                delattr(owner, name)

    @staticmethod
    def _encoding_once(encode: Any, known: list[_EncodedBlock], num_blocks: int | None, trainable: bool) -> Any:
        """``encode`` (``get_image_features`` or ``get_video_features``) reusing the blocks already in ``known``."""

        def encode_blocks(*args, **kwargs):
            wants_graph = trainable and torch.is_grad_enabled()
            # A frozen vision path trains nothing, yet transformers' enable_input_require_grads (set up for
            # gradient checkpointing) makes its patch embeddings require grad, so every backward would also
            # run back through the vision tower for nothing.
            graph_mode = nullcontext() if wants_graph else torch.no_grad()
            calls = _split_call(args, kwargs, num_blocks) if num_blocks else None
            if calls is None:
                with graph_mode:
                    return encode(*args, **kwargs)

            features = []
            for call in calls:
                inputs = _tensors(call)
                match = next(
                    (block for block in known if block.has_graph == wants_graph and _all_equal(block.inputs, inputs)),
                    None,
                )
                if match is None:
                    with graph_mode:
                        match = _EncodedBlock(inputs, encode(*call[0], **call[1]), has_graph=wants_graph)
                    known.append(match)
                features.append(match.features)
            return join_block_features(features)

        return encode_blocks
