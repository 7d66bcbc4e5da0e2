"""The TPO trainer: LLaMA-Factory's DPO trainer with the visual-aware objective of TPO_METHOD §4.

Everything but the loss is inherited from ``CustomDPOTrainer`` (reference model preparation for
DeepSpeed/FSDP/DDP, optimizer, scheduler, metric logging with the cross-rank mean), so TPO trains
with the same options as ``stage: dpo``.
"""

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
from llamafactory.train.dpo.trainer import CustomDPOTrainer
from llamafactory.train.trainer_utils import nested_detach
from typing_extensions import override

from .collator import PAIR_IMAGES_KEY
from .corruption import EVAL_STEP_KEY, ImageCorrupter
from .objective import (
    TokenScores,
    log_token_weight,
    masked_mean,
    preference_losses,
    sequence_logps,
    target_token_scores,
    visual_score,
)


if TYPE_CHECKING:
    from transformers import PreTrainedModel


class CustomTPOTrainer(CustomDPOTrainer):
    def __init__(self, image_corrupter: ImageCorrupter, **kwargs):
        self.image_corrupter = image_corrupter
        super().__init__(**kwargs)

    def _token_scores(
        self, model: "PreTrainedModel", inputs: dict[str, Any], labels: torch.Tensor
    ) -> tuple[TokenScores, torch.Tensor]:
        """One forward pass: per-token target scores and each row's mean logit (LLaMA-Factory's `logits/*`)."""
        logits = model(**inputs, return_dict=True, use_cache=False).logits
        return target_token_scores(logits, labels), logits.detach().float().mean(dim=(1, 2))

    def _token_log_weights(
        self, clean: TokenScores, corrupted: Optional[TokenScores], has_image: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual scores and ``log c`` of one model's tokens; weight 1 where no weight applies (§2, §3)."""
        if corrupted is None:
            zeros = torch.zeros_like(clean.logp)
            return zeros, zeros

        args = self.finetuning_args
        if args.tpo_score == "logit":
            score = visual_score(clean.logit, corrupted.logit)
        else:
            score = visual_score(clean.logp, corrupted.logp)

        num_pairs = score.size(0) // 2
        chosen_score, rejected_score = score.split(num_pairs, dim=0)
        weighted_rows = has_image.clone()
        if args.tpo_reward_on == "chosen":
            weighted_rows[num_pairs:] = False
        elif args.tpo_reward_on == "rejected":
            weighted_rows[:num_pairs] = False

        log_weight = torch.cat(
            [
                log_token_weight(chosen_score, rejected=False, offset=args.tpo_reward_offset),
                log_token_weight(rejected_score, rejected=True, offset=args.tpo_reward_offset),
            ]
        )
        log_weight = log_weight * weighted_rows.unsqueeze(-1) * clean.mask
        return score * has_image.unsqueeze(-1) * clean.mask, log_weight

    @override
    def get_batch_loss_metrics(
        self,
        model: "PreTrainedModel",
        batch: dict[str, Any],
        train_eval: Literal["train", "eval"] = "train",
    ) -> tuple[torch.Tensor, dict[str, float]]:
        r"""TPO loss (TPO_METHOD §4) and the DPO metrics plus ``tpo/score_*`` and ``tpo/weight_*``."""
        args = self.finetuning_args
        inputs = nested_detach(dict(batch), clone=True)  # the forward passes must not alter the batch
        pair_images = inputs.pop(PAIR_IMAGES_KEY)
        labels = inputs.pop("labels")
        num_pairs = labels.size(0) // 2
        has_image = torch.tensor([len(images) > 0 for images in pair_images] * 2, device=labels.device)

        step_key = self.state.global_step if train_eval == "train" else EVAL_STEP_KEY
        corrupted_mm_inputs = self.image_corrupter.corrupted_inputs(pair_images, inputs, step_key)
        corrupted_inputs = None
        if corrupted_mm_inputs is not None:
            corrupted_inputs = {**inputs, **self._prepare_inputs(corrupted_mm_inputs)}

        policy_clean, policy_mean_logits = self._token_scores(model, inputs, labels)
        policy_corrupted = None
        if corrupted_inputs is not None:
            with torch.no_grad() if args.tpo_detach_reward else nullcontext():
                policy_corrupted, _ = self._token_scores(model, corrupted_inputs, labels)

        if self.ref_model is None:
            ref_model, ref_context = model, self.accelerator.unwrap_model(model).disable_adapter()
        else:
            ref_model, ref_context = self.ref_model, nullcontext()

        with torch.no_grad(), ref_context:
            ref_clean, _ = self._token_scores(ref_model, inputs, labels)
            ref_corrupted = None
            if corrupted_inputs is not None:
                ref_corrupted, _ = self._token_scores(ref_model, corrupted_inputs, labels)

        policy_score, policy_log_weight = self._token_log_weights(policy_clean, policy_corrupted, has_image)
        _, ref_log_weight = self._token_log_weights(ref_clean, ref_corrupted, has_image)
        if args.tpo_detach_reward:
            policy_log_weight = policy_log_weight.detach()

        average = self.loss_type == "ipo"
        mask = policy_clean.mask
        logratios = sequence_logps(policy_clean.logp, policy_log_weight, mask, average) - sequence_logps(
            ref_clean.logp, ref_log_weight, mask, average
        )
        chosen_logratios, rejected_logratios = logratios.split(num_pairs)
        losses = preference_losses(
            chosen_logratios, rejected_logratios, self.loss_type, self.beta, self.label_smoothing
        )

        plain_logps = sequence_logps(policy_clean.logp, torch.zeros_like(policy_clean.logp), mask, average)
        chosen_logps, rejected_logps = plain_logps.detach().split(num_pairs)
        if self.ftx_gamma > 1e-6:
            chosen_mask = mask[:num_pairs]
            sft_losses = -(policy_clean.logp[:num_pairs] * chosen_mask).sum(-1) / chosen_mask.sum(-1).clamp_min(1)
            losses = losses + self.ftx_gamma * sft_losses

        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        policy_weight = policy_log_weight.detach().exp()
        policy_score = policy_score.detach()
        chosen_logits, rejected_logits = policy_mean_logits.split(num_pairs)

        prefix = "eval_" if train_eval == "eval" else ""
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen_logps.mean(),
            "logps/rejected": rejected_logps.mean(),
            "logits/chosen": chosen_logits.mean(),
            "logits/rejected": rejected_logits.mean(),
            "tpo/score_chosen": masked_mean(policy_score[:num_pairs], mask[:num_pairs]),
            "tpo/score_rejected": masked_mean(policy_score[num_pairs:], mask[num_pairs:]),
            "tpo/weight_chosen": masked_mean(policy_weight[:num_pairs], mask[:num_pairs]),
            "tpo/weight_rejected": masked_mean(policy_weight[num_pairs:], mask[num_pairs:]),
        }
        return losses.mean(), {f"{prefix}{key}": value.item() for key, value in metrics.items()}
