"""A separate reference model (``ref_model``) must read the policy's token ids and images the same way.

The TPO loss compares the policy's and the reference's log-probabilities of the same token ids, with the same
image tokens in the prompt. A reference whose tokenizer maps ids to other words trains silently against
nonsense; one of another architecture or image-token layout loads both models and fails at step 1
(``not enough values to unpack``, ``Image features and image tokens do not match``). Both are refused here,
from the tokenizers and configs alone, before either model loads.
"""

from typing import TYPE_CHECKING, Any, Optional

from llamafactory.hparams import ModelArguments
from llamafactory.model import load_config, load_tokenizer


if TYPE_CHECKING:
    from ...hparams.tpo_args import TPOFinetuningArguments

# Config fields that fix how many tokens an image becomes, and which token it is.
IMAGE_LAYOUT = ("image_token_id", "image_token_index", "mm_tokens_per_image", "image_seq_length")
VISION_LAYOUT = ("patch_size", "spatial_merge_size", "temporal_patch_size", "image_size")


def check_reference_model(
    model_args: "ModelArguments", finetuning_args: "TPOFinetuningArguments", tokenizer: Any
) -> None:
    """Raise ``ValueError`` naming ``ref_model`` and what differs from the policy; nothing without ``ref_model``."""
    if finetuning_args.ref_model is None:
        return
    ref_args = ModelArguments.copyfrom(
        model_args,
        model_name_or_path=finetuning_args.ref_model,
        adapter_name_or_path=finetuning_args.ref_model_adapters,
        quantization_bit=finetuning_args.ref_model_quantization_bit,
    )  # as LLaMA-Factory's create_ref_model loads it
    difference = layout_difference(load_config(model_args), load_config(ref_args)) or tokenizer_difference(
        tokenizer, load_tokenizer(ref_args)["tokenizer"]
    )
    if difference:
        raise ValueError(
            f"`ref_model: {finetuning_args.ref_model}` cannot be the reference of `model_name_or_path: "
            f"{model_args.model_name_or_path}`: {difference}. The reference must read the policy's token ids and "
            "image tokens as the policy does: use a checkpoint of the same model (e.g. the SFT model the policy "
            "starts from), or leave `ref_model` unset."
        )


def tokenizer_difference(policy: Any, reference: Any) -> Optional[str]:
    """How two tokenizers map ids differently, or ``None`` if they map every id to the same token."""
    policy_vocab, reference_vocab = policy.get_vocab(), reference.get_vocab()
    if policy_vocab != reference_vocab:
        moved = sorted(
            token
            for token in policy_vocab.keys() & reference_vocab.keys()
            if policy_vocab[token] != reference_vocab[token]
        )
        only = sorted(policy_vocab.keys() ^ reference_vocab.keys())
        shown = ", ".join(repr(token) for token in (moved + only)[:5])
        return (
            f"its vocabulary differs ({len(policy_vocab)} against {len(reference_vocab)} tokens; {len(moved)} with "
            f"another id, {len(only)} in one only, e.g. {shown})"
        )
    policy_special, reference_special = sorted(policy.all_special_tokens), sorted(reference.all_special_tokens)
    if policy_special != reference_special:
        return f"its special tokens differ ({policy_special} against {reference_special})"
    return None


def layout_difference(policy: Any, reference: Any) -> Optional[str]:
    """How two model configs differ in architecture or image-token layout, or ``None``."""
    if policy.model_type != reference.model_type:
        return f"it is a `{reference.model_type}` model, the policy a `{policy.model_type}` model"
    for name in IMAGE_LAYOUT:
        if getattr(policy, name, None) != getattr(reference, name, None):
            return f"its `{name}` is {getattr(reference, name, None)}, the policy's {getattr(policy, name, None)}"
    policy_vision, reference_vision = getattr(policy, "vision_config", None), getattr(reference, "vision_config", None)
    for name in VISION_LAYOUT:
        ours, theirs = getattr(policy_vision, name, None), getattr(reference_vision, name, None)
        if ours != theirs:
            return f"its vision `{name}` is {theirs}, the policy's {ours}: images become other numbers of tokens"
    return None
