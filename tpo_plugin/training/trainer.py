"""The TPO trainer: LLaMA-Factory's DPO trainer with the forward passes and the visual-aware objective of
docs/method.md §4.

Everything but the passes, the loss and its metrics is inherited: from ``CustomDPOTrainer`` (reference model
preparation for DeepSpeed/FSDP/DDP, optimizer, scheduler, metric logging with the cross-rank mean), so TPO trains
with the same options as ``stage: dpo``; from :class:`~.batch.step_keys.StepKeyedTraining` (the training
loader's step keys) and :class:`~.run.checkpoints.CheckpointGuards` (what a checkpoint must be).
"""

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Optional

import torch
from llamafactory.train.dpo.trainer import CustomDPOTrainer
from llamafactory.train.trainer_utils import nested_detach
from transformers.integrations import is_deepspeed_zero3_enabled
from typing_extensions import override

from ..method.objective import (
    TokenScores,
    first_scored_position,
    masked_mean,
    target_token_scores,
    tpo_batch_loss,
)
from .batch.collator import PairBatch
from .batch.image_features import ImageFeatureCache, image_feature_owner, vision_path_is_frozen
from .batch.keys import EVAL_STEP_KEY
from .batch.step_keys import StepKeyedTraining
from .reference.scores import ReferenceScores, pair_values
from .run.checkpoints import NUMERICS_ADVICE, CheckpointGuards
from .run.stability import RunawayMonitor
from .run.stopping import any_rank


if TYPE_CHECKING:
    from transformers import PreTrainedModel


def concat_rows(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two model input batches as one: rows of ``first``, then rows of ``second``.

    Text tensors and multimodal tensors list rows (or images, in row order) along dim 0; M-RoPE position
    ids are (sections, rows, length).
    """
    joined = {}
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            dim = 1 if key == "position_ids" and value.dim() == 3 else 0
            joined[key] = torch.cat([value, second[key]], dim=dim)
        elif isinstance(value, list):
            joined[key] = value + second[key]
        else:
            joined[key] = value
    return joined


@contextmanager
def logits_from_position(model: "PreTrainedModel", first_position: int, mean_logits: list[torch.Tensor]):
    """While active, ``model`` computes logits only from ``first_position`` on; yields the position it uses.

    Earlier positions predict prompt tokens, which TPO never scores; with a 448x448 image (256 image tokens)
    they are over half of a row, and the (rows, positions, vocabulary) logits are a step's largest tensor.
    ``mean_logits`` still receives each row's mean logit over all positions and the whole vocabulary
    (LLaMA-Factory's ``logits/*`` metrics), without those logits: mean_v(h . w_v + b_v) = h . mean_v(w_v)
    + mean_v(b_v). An LM head other than a plain linear layer computes all logits, as before.
    """
    lm_head = model.get_output_embeddings()

    def keep_scored_positions(module: torch.nn.Linear, args: tuple) -> tuple:
        hidden = args[0].detach()
        row_means = hidden.float() @ module.weight.detach().mean(dim=0, dtype=torch.float32)
        if module.bias is not None:
            row_means += module.bias.detach().mean(dtype=torch.float32)
        mean_logits.append(row_means.mean(dim=-1))
        return (args[0][:, first_position:],)

    def mean_of_all_logits(module: torch.nn.Module, args: tuple, logits: torch.Tensor) -> None:
        mean_logits.append(logits.detach().mean(dim=(1, 2), dtype=torch.float32))

    if type(lm_head) is torch.nn.Linear:
        handle = lm_head.register_forward_pre_hook(keep_scored_positions)
    else:
        first_position = 0
        handle = lm_head.register_forward_hook(mean_of_all_logits)
    try:
        yield first_position
    finally:
        handle.remove()


class BatchTokenScores(NamedTuple):
    """The per-token results of a step's forward passes, rows chosen then rejected (docs/method.md §2 and §4)."""

    policy_clean: TokenScores
    policy_corrupted: Optional[TokenScores]  # None when no rank's batch has an image
    ref_clean: TokenScores
    ref_corrupted: Optional[TokenScores]
    has_image: torch.Tensor  # (2n,) bool: the row's pair has an image or a video
    policy_mean_logits: torch.Tensor  # (2n,) mean logit of each clean policy row (LLaMA-Factory's logits/*)
    labels: torch.Tensor  # (2n, L)


def corrupted_passes_used(finetuning_args: Any) -> bool:
    """Whether the loss reads the corrupted image at all: token weights (``tpo_reward_on`` other than ``none``) or
    the conditional term. Without either every weight is 1 and the step runs DPO's passes only."""
    return finetuning_args.tpo_reward_on != "none" or finetuning_args.tpo_conditional_weight > 0


def policy_corrupted_pass_needs_graph(finetuning_args: Any) -> bool:
    """Gradients flow through the policy's corrupted pass: through c^theta (log-additive weights, not detached:
    docs/method.md Eq. 6) or through the conditional term's ``log p_theta(y_w | x, v_k)`` (Eq. 17)."""
    weights_have_gradient = (
        finetuning_args.tpo_weighting == "log_additive"
        and finetuning_args.tpo_reward_on != "none"
        and not finetuning_args.tpo_detach_reward
    )
    return weights_have_gradient or finetuning_args.tpo_conditional_weight > 0


def weight_term_used(finetuning_args: Any) -> bool:
    """The margin holds the weight term ``sum (log c^theta - log c^ref)`` (log-additive weights on some side)."""
    return finetuning_args.tpo_weighting == "log_additive" and finetuning_args.tpo_reward_on != "none"


def reference_corrupted_pass_used(finetuning_args: Any) -> bool:
    """The loss reads the reference's corrupted pass: its weights c^ref, or the conditional term."""
    return weight_term_used(finetuning_args) or finetuning_args.tpo_conditional_weight > 0


def corrupted_pass_inputs(
    inputs: dict[str, Any], corrupted_inputs: Optional[dict[str, Any]], images_on_any_rank: bool
) -> Optional[dict[str, Any]]:
    """The inputs of this rank's corrupted passes: ``None`` only when no rank's batch has an image.

    Under ZeRO-3 (and FSDP) parameters are gathered module by module, so every rank must run the same forward
    passes, or the ranks hang or fail in mismatched collectives. A rank whose batch has no image while another
    rank's has one runs its corrupted passes on its clean inputs, which reach the vision tower too (LLaMA-Factory's
    collator gives an image-less batch a fake image). Its rows have no image, so their visual score stays 0 and
    their weight 1 (docs/method.md §3): the loss is that of skipping the passes.
    """
    if corrupted_inputs is not None or not images_on_any_rank:
        return corrupted_inputs
    return dict(inputs)


class CustomTPOTrainer(CheckpointGuards, StepKeyedTraining, CustomDPOTrainer):
    """``data_collator`` must be a :class:`~.batch.collator.TPODataCollatorWithPadding`: it corrupts the images."""

    def __init__(self, **kwargs):
        self.reference_scores: Optional[ReferenceScores] = None  # set by use_reference_scores
        super().__init__(**kwargs)
        self.runaway_monitor = RunawayMonitor(self.accelerator)  # reads every training batch's metrics
        self.add_callback(self.runaway_monitor)
        # Under ZeRO-3 and FSDP every rank must run the same modules in the same order (parameters are
        # gathered per module), which reusing encodings depending on a batch's content would break.
        owner = image_feature_owner(self.model)
        self.image_features = ImageFeatureCache(
            reuse_encodings=not (is_deepspeed_zero3_enabled() or self.is_fsdp_enabled),
            share_with_reference=(
                self.finetuning_args.ref_model is None and owner is not None and vision_path_is_frozen(owner)
            ),
        )

    def _token_scores(
        self,
        model: "PreTrainedModel",
        inputs: dict[str, Any],
        labels: torch.Tensor,
        passes: int = 1,
        reference: bool = False,
    ) -> tuple[TokenScores, torch.Tensor]:
        """One forward pass: per-token target scores and each row's mean logit (LLaMA-Factory's `logits/*`).

        The rows are ``passes`` passes (clean, corrupted) over the chosen rows and then the rejected rows of
        the same pairs, so their images form ``2 * passes`` equal blocks, encoded once per step each.
        """
        unwrapped = self.accelerator.unwrap_model(model)
        mean_logits = []
        with (
            self.image_features.encode_once(unwrapped, num_blocks=2 * passes, reference=reference),
            logits_from_position(unwrapped, first_scored_position(labels), mean_logits) as first_position,
        ):
            logits = model(**inputs, return_dict=True, use_cache=False).logits
        return target_token_scores(logits, labels[:, first_position:]), mean_logits[0]

    def _paired_token_scores(
        self,
        model: "PreTrainedModel",
        inputs: dict[str, Any],
        corrupted_inputs: dict[str, Any],
        labels: torch.Tensor,
        reference: bool = False,
    ) -> tuple[tuple[TokenScores, TokenScores], torch.Tensor]:
        """Clean and corrupted passes as one forward over twice the rows; mean logits of the clean rows."""
        scores, mean_logits = self._token_scores(
            model, concat_rows(inputs, corrupted_inputs), labels.repeat(2, 1), passes=2, reference=reference
        )
        num_rows = labels.size(0)
        clean, corrupted = (TokenScores(*(field.split(num_rows)[part] for field in scores)) for part in (0, 1))
        return (clean, corrupted), mean_logits[:num_rows]

    @contextmanager
    def _reference_context(self, model: "PreTrainedModel"):
        """The reference model: a frozen copy (``ref_model``), or the policy with its adapter disabled."""
        if self.ref_model is not None:
            yield self.ref_model
        else:
            with self.accelerator.unwrap_model(model).disable_adapter():
                yield model

    def _stop_unless_finite(self, losses: torch.Tensor, visual_score: torch.Tensor) -> None:
        """Stop at the first non-finite loss or visual score, before it reaches the weights or a checkpoint."""
        if any_rank(self.accelerator, ~torch.isfinite(losses).all() | ~torch.isfinite(visual_score).all()):
            raise FloatingPointError(
                f"Stage tpo stopped at step {self.state.global_step + 1}: the loss or a visual score is not finite "
                f"(nan/inf). This step did not update the weights and wrote no checkpoint; checkpoints already "
                f"saved in {self.args.output_dir} are intact. {NUMERICS_ADVICE}"
            )

    def _unpack_batch(self, batch: dict[str, Any], step_key: int) -> PairBatch:
        """A collated batch as model inputs, corrupted model inputs (the step's noise), labels, image flags, keys."""
        pairs = self.data_collator.unpack(nested_detach(dict(batch), clone=True), step_key)  # passes must not alter it
        if pairs.corrupted_inputs is None:
            return pairs
        return pairs._replace(corrupted_inputs=self._prepare_inputs(pairs.corrupted_inputs))  # built on the CPU

    @torch.no_grad()
    def _reference_token_scores(
        self,
        model: "PreTrainedModel",
        inputs: dict[str, Any],
        corrupted_inputs: Optional[dict[str, Any]],
        labels: torch.Tensor,
    ) -> tuple[TokenScores, Optional[TokenScores]]:
        """The reference model's clean token scores, and its corrupted ones unless ``corrupted_inputs`` is None."""
        with self._reference_context(model) as ref_model:
            if corrupted_inputs is None:
                return self._token_scores(ref_model, inputs, labels, reference=True)[0], None
            scores, _ = self._paired_token_scores(ref_model, inputs, corrupted_inputs, labels, reference=True)
            return scores

    @torch.no_grad()
    def reference_pair_values(self, features: list[dict[str, Any]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """What the reference store keeps of these dataset rows: per pair key, the reference's token scores with
        the noise of an evaluation step (:func:`~.reference.scores.compute_reference_scores` runs this per batch)."""
        pairs = self._unpack_batch(self._prepare_inputs(self.data_collator(features)), EVAL_STEP_KEY)
        images_on_any_rank = any_rank(self.accelerator, pairs.corrupted_inputs is not None)
        corrupted_inputs = corrupted_pass_inputs(pairs.inputs, pairs.corrupted_inputs, images_on_any_rank)
        self.image_features.clear()
        with_corrupted = reference_corrupted_pass_used(self.finetuning_args)
        clean, corrupted = self._reference_token_scores(
            self.model_wrapped, pairs.inputs, corrupted_inputs if with_corrupted else None, pairs.labels
        )
        self.image_features.clear()
        return dict(zip(pairs.pair_keys, pair_values(clean, corrupted, pairs.has_image), strict=True))

    def use_reference_scores(self, scores: ReferenceScores) -> None:
        """From now on the reference model is never run: its scores come from ``scores``.

        A separate reference model (full fine-tuning, or ``ref_model``) is freed; for LoRA the reference is the
        policy with its adapter disabled, which costs no memory of its own.
        """
        self.reference_scores = scores
        if self.ref_model is not None:
            self.ref_model = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def batch_token_scores(
        self, model: "PreTrainedModel", batch: dict[str, Any], step_key: int, reference_scores: bool = False
    ) -> BatchTokenScores:
        """Every forward pass of a TPO step: clean and corrupted, policy and reference (docs/method.md §2 and §4).

        ``step_key`` keys the corruption noise: the global step while training, ``EVAL_STEP_KEY`` otherwise.
        The reference's corrupted pass runs only when its weights enter the loss, or when ``reference_scores``
        asks for them. Whenever any rank's batch has an image, every rank runs the corrupted passes
        (:func:`corrupted_pass_inputs`). The training loss and the per-token view
        (:mod:`tpo_plugin.training.diagnostics.token_view`) both start here.
        """
        inputs, corrupted_inputs, labels, has_image, pair_keys = self._unpack_batch(batch, step_key)
        if not (reference_scores or corrupted_passes_used(self.finetuning_args)):
            corrupted_inputs = None  # no loss term reads the corrupted image: DPO's passes, on every rank alike
        images_on_any_rank = any_rank(self.accelerator, corrupted_inputs is not None)  # every rank calls this
        corrupted_inputs = corrupted_pass_inputs(inputs, corrupted_inputs, images_on_any_rank)
        self.image_features.clear()  # features of an earlier step's images are not reused
        if corrupted_inputs is None or not policy_corrupted_pass_needs_graph(self.finetuning_args):
            policy_clean, policy_mean_logits = self._token_scores(model, inputs, labels)
            policy_corrupted = None
            if corrupted_inputs is not None:
                with torch.no_grad():  # no gradient flows through the corrupted pass: it needs no graph
                    policy_corrupted, _ = self._token_scores(model, corrupted_inputs, labels)
        else:  # gradients flow through both passes: run them as one batch
            (policy_clean, policy_corrupted), policy_mean_logits = self._paired_token_scores(
                model, inputs, corrupted_inputs, labels
            )

        if self.reference_scores is not None:
            ref_clean, ref_corrupted = self.reference_scores.token_scores(pair_keys, policy_clean.mask)
        else:
            with_corrupted = reference_scores or reference_corrupted_pass_used(self.finetuning_args)
            ref_clean, ref_corrupted = self._reference_token_scores(
                model, inputs, corrupted_inputs if with_corrupted else None, labels
            )
        self.image_features.clear()  # the step's forwards are done: free the features
        return BatchTokenScores(
            policy_clean, policy_corrupted, ref_clean, ref_corrupted, has_image, policy_mean_logits, labels
        )

    @override
    def get_batch_loss_metrics(
        self,
        model: "PreTrainedModel",
        batch: dict[str, Any],
        train_eval: Literal["train", "eval"] = "train",
    ) -> tuple[torch.Tensor, dict[str, float]]:
        r"""TPO loss (docs/method.md §4) and the DPO metrics plus ``tpo/score_*`` and ``tpo/weight_*``."""
        args = self.finetuning_args
        step_key = self.state.global_step if train_eval == "train" else EVAL_STEP_KEY
        policy_clean, policy_corrupted, ref_clean, ref_corrupted, has_image, policy_mean_logits, labels = (
            self.batch_token_scores(model, batch, step_key)
        )
        num_pairs = labels.size(0) // 2

        result = tpo_batch_loss(
            policy_clean,
            policy_corrupted,
            ref_clean,
            ref_corrupted,
            has_image,
            loss_type=self.loss_type,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            ftx=self.ftx_gamma,
            score_kind=args.tpo_score,
            reward_on=args.tpo_reward_on,
            offset=args.tpo_reward_offset,
            detach_reward=args.tpo_detach_reward,
            weighting=args.tpo_weighting,
            weight_clip=args.tpo_weight_clip,
            conditional_weight=args.tpo_conditional_weight,
            anchor_weight=args.tpo_anchor_weight,
        )
        if train_eval == "train":
            self._stop_unless_finite(result.losses, result.visual_score)

        chosen_rewards, rejected_rewards = result.chosen_rewards, result.rejected_rewards
        chosen_logits, rejected_logits = policy_mean_logits.split(num_pairs)
        mask = policy_clean.mask

        prefix = "eval_" if train_eval == "eval" else ""
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": result.chosen_logps.mean(),
            "logps/rejected": result.rejected_logps.mean(),
            "logits/chosen": chosen_logits.mean(),
            "logits/rejected": rejected_logits.mean(),
            "tpo/score_chosen": masked_mean(result.visual_score[:num_pairs], mask[:num_pairs]),
            "tpo/score_rejected": masked_mean(result.visual_score[num_pairs:], mask[num_pairs:]),
            "tpo/weight_chosen": masked_mean(result.token_weight[:num_pairs], mask[:num_pairs]),
            "tpo/weight_rejected": masked_mean(result.token_weight[num_pairs:], mask[num_pairs:]),
        }
        if result.conditional_margin is not None:
            metrics["tpo/conditional_margin"] = masked_mean(result.conditional_margin, has_image[:num_pairs])
        if result.anchor_reward is not None:
            metrics["tpo/anchor_reward"] = result.anchor_reward.mean()
        if weight_term_used(args):  # the reference's visual scores exist: the stability monitor
            scored = mask & has_image.unsqueeze(-1)
            metrics["tpo/score_drift_chosen"] = masked_mean(result.score_drift[:num_pairs], scored[:num_pairs])
            metrics["tpo/score_drift_rejected"] = masked_mean(result.score_drift[num_pairs:], scored[num_pairs:])
            metrics["tpo/normalizer_drift"] = masked_mean(result.normalizer_drift, scored)
            metrics["tpo/weight_term_share"] = result.weight_term_share
        metrics = {f"{prefix}{key}": value.item() for key, value in metrics.items()}
        if train_eval == "train":
            self.runaway_monitor.record(metrics)
        return result.losses.mean(), metrics
