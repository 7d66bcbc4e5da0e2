"""The reference model's token scores, computed once before training (``tpo_precompute_ref: true``): the store,
the pass that computes it and the callback that loads or computes it when training begins.

The TPO loss reads the reference model only through its clean and corrupted target-token scores on each
answer's tokens (docs/method.md §2–§4). With one fixed corrupted copy per image (``tpo_noise_per: sample``) they
are the same every time a pair is seen, so one no-grad pass over the training and evaluation pairs before
training replaces the reference's forwards at every step, and a separate reference model can be freed.

The scores are stored in ``OUTPUT_DIR/tpo_reference_scores.pt`` with a digest of everything they depend on
(reference model, adapters and their files, data and images, template, cutoff, image sizes, precision, the
objective's settings and seed, plugin version): a resume reuses them, any change recomputes them.
"""

import dataclasses
import hashlib
import json
import os
from importlib.metadata import version
from typing import Any, Callable, Optional

import torch
from llamafactory.extras import logging
from transformers import TrainerCallback

from ...method.objective import TokenScores
from ..batch.keys import PAIR_KEY
from ..run.stopping import PassInterrupted, StopOnSignalCallback, any_rank, stop_between_batches


logger = logging.get_logger("llamafactory.train.tpo")


SCORES_FILE = "tpo_reference_scores.pt"
# Per response token, in this order: clean logit, clean log p, corrupted logit, corrupted log p.
NUM_FIELDS = 4
_HASHED_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def add_pair_keys(dataset_module: dict[str, Any]) -> dict[str, Any]:
    """The datasets with a ``tpo_pair_key`` column: ``train/<row>``, ``eval/<row>`` or ``eval_<name>/<row>``."""
    keyed = {}
    for split, datasets in dataset_module.items():
        prefix = split.removesuffix("_dataset")
        if isinstance(datasets, dict):
            keyed[split] = {name: _with_keys(data, f"{prefix}_{name}") for name, data in datasets.items()}
        else:
            keyed[split] = _with_keys(datasets, prefix)
    return keyed


def _with_keys(dataset: Any, prefix: str) -> Any:
    return dataset.add_column(PAIR_KEY, [f"{prefix}/{row}" for row in range(len(dataset))])


def with_pair_keys(
    dataset_module: dict[str, Any],
    model_args: Any,
    data_args: Any,
    training_args: Any,
    finetuning_args: Any,
    objective: dict[str, Any],
) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    """The datasets with pair keys, every dataset whose pairs need scores, and the identity of their scores."""
    dataset_module = add_pair_keys(dataset_module)
    datasets = keyed_datasets(dataset_module)
    identity = reference_identity(
        model_args, data_args, training_args, finetuning_args, objective, data_digest(datasets)
    )
    return dataset_module, datasets, identity


def keyed_datasets(dataset_module: dict[str, Any]) -> list[Any]:
    """Every dataset of the run (training, then evaluation ones) whose pairs need reference scores."""
    datasets = []
    for data in dataset_module.values():
        datasets += list(data.values()) if isinstance(data, dict) else [data]
    return datasets


def _file_digest(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_files(path: Optional[str]) -> Any:
    """Name, size and modification time of each file of a local model or adapter folder; a hub id as it is."""
    if not path or not os.path.isdir(path):
        return path
    files = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            stat = os.stat(full)
            files.append([name, stat.st_size, stat.st_mtime_ns])
    return files


def _media_identity(image: Any) -> Any:
    if isinstance(image, str) and os.path.isfile(image):
        return _file_digest(image)
    if isinstance(image, dict) and image.get("bytes") is not None:
        return hashlib.blake2b(image["bytes"], digest_size=16).hexdigest()
    return repr(image)  # a URL or another reference LLaMA-Factory resolves: its name stands for it


def data_digest(datasets: list[Any]) -> str:
    """A digest of the pairs' tokens, labels, images and videos (file contents) and keys, in order."""
    digest = hashlib.sha256()
    for dataset in datasets:
        for row in dataset:
            digest.update(json.dumps([row[PAIR_KEY], *(row[column] for column in _HASHED_COLUMNS)]).encode())
            for media in (row.get("images") or [], row.get("videos") or []):
                digest.update(json.dumps([_media_identity(item) for item in media]).encode())
    return digest.hexdigest()


# Model arguments that cannot change what the reference model computes, or must not be stored: hub credentials,
# where downloads are cached, and the device each rank loads onto (the ranks must agree on the digest). Every
# other field of LLaMA-Factory's ModelArguments (loading, quantization,
# dtype, tokenizer changes, image sizes, adapters ...) is part of the identity, including fields a later
# LLaMA-Factory adds: a field the plugin does not know about recomputes the scores rather than reusing stale ones.
NOT_IDENTITY = {"hf_hub_token", "ms_hub_token", "om_hub_token", "cache_dir", "device_map"}


def _fields(arguments: Any) -> dict[str, Any]:
    """Every dataclass field of an argument object, and the values its ``__post_init__`` derived from them."""
    values = {field.name: getattr(arguments, field.name) for field in dataclasses.fields(arguments)}
    values.update({name: value for name, value in vars(arguments).items() if not name.startswith("_")})
    return {name: value for name, value in values.items() if name not in NOT_IDENTITY}


def reference_identity(
    model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any, objective: dict[str, Any], data: str
) -> dict[str, Any]:
    """Everything the stored scores depend on, as plain JSON; its digest names a valid store.

    The data digest covers the pairs as tokenised (so the template, cutoff and tokenizer's output); the model
    arguments are taken whole, so a change to any of them recomputes the scores.
    """
    adapters = model_args.adapter_name_or_path or []
    ref_adapters = finetuning_args.ref_model_adapters
    return {
        "plugin": version("tpo-plugin"),
        "model_arguments": _fields(model_args),
        "model_files": _model_files(model_args.model_name_or_path),
        "adapter_files": [[path, _model_files(path)] for path in adapters],
        "finetuning_type": finetuning_args.finetuning_type,
        "ref_model": [finetuning_args.ref_model, _model_files(finetuning_args.ref_model)],
        "ref_model_adapters": [ref_adapters, _model_files(ref_adapters)],
        "ref_model_quantization_bit": finetuning_args.ref_model_quantization_bit,
        "template": data_args.template,
        "cutoff_len": data_args.cutoff_len,
        "precision": [training_args.bf16, training_args.fp16],
        "objective": objective,
        "data": data,
    }


def identity_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_as_json(identity), sort_keys=True).encode()).hexdigest()


def _as_json(value: Any) -> Any:
    """``value`` with what plain JSON cannot hold (dtypes, enums, objects) written as its ``repr``, so that the
    stored identity loads with ``torch.load(weights_only=True)``."""
    if isinstance(value, dict):
        return {str(key): _as_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(item) for item in value]
    if value is None or type(value) in (bool, int, float, str):  # not their subclasses: a str enum pickles as itself
        return value
    return repr(value)


class ReferenceScores:
    """Per pair key, the reference's per-token values on the chosen and the rejected answer.

    ``values[key] = (chosen, rejected)``, each a ``(NUM_FIELDS, tokens)`` float32 tensor, or ``(2, tokens)``
    (clean only) for a pair without an image, or when the objective needs no corrupted reference pass.
    """

    def __init__(self, digest: str, values: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.digest = digest
        self.values = values

    def save(self, output_dir: str, identity: dict[str, Any]) -> None:
        """Write the store atomically: a half-written file never has the final name."""
        os.makedirs(output_dir, exist_ok=True)
        path = os.path.join(output_dir, SCORES_FILE)
        partial = f"{path}.partial"
        torch.save({"digest": self.digest, "identity": _as_json(identity), "values": self.values}, partial)
        os.replace(partial, path)

    @classmethod
    def load(cls, output_dir: str, digest: str) -> Optional["ReferenceScores"]:
        """The stored scores if they were computed for ``digest``; ``None`` if absent, stale or unreadable."""
        path = os.path.join(output_dir, SCORES_FILE)
        if not os.path.isfile(path):
            return None
        try:
            stored = torch.load(path, weights_only=True)
            if stored.get("digest") != digest:
                return None
            return cls(digest, stored["values"])
        except Exception as error:  # truncated, corrupt or another format: torch and pickle raise many kinds
            logger.warning_rank0(f"The stored reference scores {path} cannot be read ({error}); computing them anew.")
            return None

    def token_scores(self, pair_keys: list[str], mask: torch.Tensor) -> tuple[TokenScores, Optional[TokenScores]]:
        """The reference's clean and corrupted :class:`TokenScores` of a batch whose response tokens are ``mask``.

        Rows are chosen then rejected; the corrupted scores are ``None`` when no pair of the batch has them
        (as the live passes give when a batch has no image), and zero on the rows of pairs without them.
        """
        num_pairs = len(pair_keys)
        rows = [self.values[key][side] for side in (0, 1) for key in pair_keys]
        full = torch.zeros(NUM_FIELDS, *mask.shape, dtype=torch.float32, device=mask.device)
        for row, values in enumerate(rows):
            positions = mask[row].nonzero().squeeze(-1)
            if values.size(1) != positions.numel():
                side = "chosen" if row < num_pairs else "rejected"
                raise RuntimeError(
                    f"The stored reference scores of pair {pair_keys[row % num_pairs]} ({side}) cover "
                    f"{values.size(1)} tokens, but the batch has {positions.numel()}: {SCORES_FILE} does not "
                    "belong to this data. Delete it to recompute it."
                )
            full[: values.size(0), row, positions] = values.to(mask.device)
        clean = TokenScores(full[0], full[1], mask)
        if all(values.size(0) < NUM_FIELDS for values in rows):
            return clean, None
        return clean, TokenScores(full[2], full[3], mask)


def pair_values(
    clean: TokenScores, corrupted: Optional[TokenScores], has_image: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair of a batch (rows chosen then rejected), what :class:`ReferenceScores` stores for it."""
    num_pairs = clean.mask.size(0) // 2

    def row_values(row: int) -> torch.Tensor:
        mask = clean.mask[row]
        fields = [clean.logit[row][mask], clean.logp[row][mask]]
        if corrupted is not None and has_image[row]:
            fields += [corrupted.logit[row][mask], corrupted.logp[row][mask]]
        return torch.stack(fields).float().cpu()

    return [(row_values(pair), row_values(num_pairs + pair)) for pair in range(num_pairs)]


@torch.no_grad()
def compute_reference_scores(
    trainer: Any, datasets: list[Any], digest: str, stop_requested: Callable[[], bool] = lambda: False
) -> ReferenceScores:
    """The reference's token scores of every pair of ``datasets``, in one no-grad pass over them.

    Called when training begins, once DeepSpeed or DDP has wrapped the model; each batch goes through the
    trainer's own reference passes (``trainer.reference_pair_values``). Each rank scores every
    ``num_processes``-th pair, all ranks the same number of batches (the last pairs repeat), so that under
    ZeRO-3 every rank runs the same forwards; the results are gathered on all ranks. Between batches all
    ranks stop together (``PassInterrupted``) once any was asked to: at real scale the pass takes hours.
    """
    from accelerate.utils import gather_object
    from tqdm import tqdm

    accelerator = trainer.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    batch_size = max(1, trainer.args.per_device_eval_batch_size)
    items = [(dataset, row) for dataset in datasets for row in range(len(dataset))]
    shard = items[rank::world]
    shard += shard[-1:] * (-(-len(items) // world) - len(shard))  # equal length on every rank
    was_training = trainer.model.training
    trainer.model.eval()  # as LLaMA-Factory prepares a separate reference model: no dropout
    values = {}
    try:
        starts = range(0, len(shard), batch_size)
        for done, start in enumerate(
            tqdm(starts, desc="Reference scores", disable=not trainer.is_local_process_zero())
        ):
            stop_between_batches(accelerator, stop_requested, done, len(starts))
            values.update(
                trainer.reference_pair_values(
                    [dict(dataset[row]) for dataset, row in shard[start : start + batch_size]]
                )
            )
    finally:
        trainer.model.train(was_training)

    if world > 1:
        gathered = {}
        for part in gather_object([values]):
            gathered.update(part)
        values = gathered
    return ReferenceScores(digest, values)


class ReferenceScoresCallback(TrainerCallback):
    """When training begins (the model wrapped for DeepSpeed or DDP), load or compute the reference scores.

    Stored scores are reused when their digest matches this run's, else every rank computes its share anew
    and rank 0 stores them; from then on the trainer never runs the reference model. A stop signal during
    the computation ends the run after the current batch, with nothing stored and nothing trained.
    """

    def __init__(
        self, trainer: Any, datasets: list[Any], identity: dict[str, Any], stop_on_signal: StopOnSignalCallback
    ):
        self.trainer = trainer
        self.datasets = datasets
        self.identity = identity
        self.stop_on_signal = stop_on_signal

    def on_train_begin(self, args, state, control, **kwargs):
        digest = identity_digest(self.identity)
        path = os.path.join(args.output_dir, SCORES_FILE)
        scores = ReferenceScores.load(args.output_dir, digest)
        if any_rank(self.trainer.accelerator, scores is None):
            num_pairs = sum(len(dataset) for dataset in self.datasets)
            reason = "they are not stored yet" if not os.path.isfile(path) else "what they depend on changed"
            logger.info_rank0(f"Computing the reference scores of {num_pairs} pairs once ({reason}): {path}.")
            try:
                scores = compute_reference_scores(self.trainer, self.datasets, digest, self.stop_on_signal.requested)
            except PassInterrupted as interrupted:
                logger.warning_rank0(
                    f"Interrupted while computing the reference scores, {interrupted}: nothing was stored and "
                    f"nothing trained. Run the same command again to compute them."
                )
                raise SystemExit(self.stop_on_signal.exit_code()) from None
            if args.should_save:
                scores.save(args.output_dir, self.identity)
        else:
            logger.info_rank0(f"Reusing the reference scores stored in {path}.")
        self.trainer.use_reference_scores(scores)
