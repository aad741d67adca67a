"""BERT LightningModules: masked-LM pretraining and sequence classification.

Both wrap transformers' BERT classes built from a config (random init, nothing downloaded), so
their weights load with ``from_pretrained`` after ``module.model.save_pretrained(dir)``. With
``pretrained`` they start from other weights instead: one of our checkpoints, or any BERT-like
encoder saved with ``save_pretrained`` (BERT, RoBERTa, DistilBERT, ...; the class comes from its
config through ``AutoModelForMaskedLM`` / ``AutoModelForSequenceClassification``).

The special-token ids (mask, padding, the tokens never masked) come from the model's tokenizer
(:func:`~lightning_efficient.data.tokenizers.find_special_ids`), so a public BERT's or RoBERTa's
``tokenizer.json`` works as well as ours (``[PAD] [UNK] [CLS] [SEP] [MASK]`` at ids 0..4, also the
layout assumed while the model has no tokenizer yet).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn
from torchmetrics import MeanMetric
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from lightning_efficient.checkpoint import read_metadata, write_metadata
from lightning_efficient.data.tokenizers import BERT_SPECIAL_IDS, BERT_SPECIAL_TOKENS, SpecialIds, find_special_ids
from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError
from lightning_efficient.losses import (
    SOFT_TARGETS_KEY,
    importance_weighted_loss,
    is_importance_batch,
    predicting,
    prediction_losses,
    row_gradient_norms,
    softmax_cross_entropy,
)
from lightning_efficient.models.base import (
    EfficientModule,
    TextClassifier,
    _check_shape,
    _copy_checkpoint_weights,
    class_names,
    require_argument,
)
from lightning_efficient.models.presets import ModelSize, resolve_size
from lightning_efficient.models.pretrained import resolve_pretrained

__all__ = [
    "BertClassifier",
    "BertMLM",
    "bert_config",
    "check_pad_token",
    "mask_tokens",
    "masked_lm_head",
    "special_ids_of",
]

MASK_TOKEN_ID = BERT_SPECIAL_TOKENS.index("[MASK]")
NUM_SPECIAL = len(BERT_SPECIAL_TOKENS)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generator: torch.Generator,
    vocab_size: int,
    probability: float = 0.15,
    mask_token_id: int = MASK_TOKEN_ID,
    num_special: int = NUM_SPECIAL,
    special_ids: Collection[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: pick ``probability`` of the real tokens; 80% -> [MASK], 10% random, 10% kept.

    Special tokens (``special_ids``, by default the ids below ``num_special``) and padding are
    never picked, and random replacements are never special; at least one token per batch is
    picked. Random draws come from ``generator`` (on the CPU), so a run that checkpoints the
    generator's state resumes with the same masks. With ``special_ids`` ``0..num_special-1`` the
    masks are those of ``num_special`` for the same generator state.

    Args:
        input_ids: ``(B, T)`` token ids.
        attention_mask: ``(B, T)``, 1 for real tokens.
        generator: CPU generator owning the masking randomness.
        vocab_size: Random replacements are drawn from the ids of ``[0, vocab_size)`` that are not special.
        probability: Share of tokens to predict.
        mask_token_id: Id of the mask token (``[MASK]``, ``<mask>``).
        num_special: Ids below this are special tokens (when ``special_ids`` is not given).
        special_ids: The special token ids, at any positions (e.g. a public BERT's 0 and 100..103).

    Returns:
        ``(masked_input_ids, labels)``; ``labels`` is -100 wherever no prediction is asked.

    Examples:
        >>> ids = torch.arange(5, 25).view(2, 10)
        >>> masked, labels = mask_tokens(ids, torch.ones_like(ids), torch.Generator().manual_seed(0), 30)
        >>> bool(((labels == -100) | (labels == ids)).all()), int((labels != -100).sum()) >= 1
        (True, True)
    """
    shape = input_ids.shape
    specials = torch.tensor(sorted(special_ids if special_ids is not None else range(num_special)), dtype=torch.long)
    candidates = (attention_mask.cpu() == 1) & ~torch.isin(input_ids.cpu(), specials)
    chosen = (torch.rand(shape, generator=generator) < probability) & candidates
    if not chosen.any() and candidates.any():
        chosen.view(-1)[candidates.view(-1).nonzero()[0]] = True
    action = torch.rand(shape, generator=generator)
    ordinary = torch.arange(vocab_size)
    ordinary = ordinary[~torch.isin(ordinary, specials)]
    # Indexing the ordinary ids with randint(len) draws the same numbers as randint(num_special, vocab_size).
    random_tokens = ordinary[torch.randint(len(ordinary), shape, generator=generator)]
    device = input_ids.device
    chosen = chosen.to(device)
    labels = input_ids.masked_fill(~chosen, -100)
    masked = input_ids.clone()
    masked[chosen & (action.to(device) < 0.8)] = mask_token_id
    replace = chosen & (action.to(device) >= 0.8) & (action.to(device) < 0.9)
    masked[replace] = random_tokens.to(device)[replace]
    return masked, labels


def bert_config(size: ModelSize, vocab_size: int, max_length: int, dropout: float, **extra: Any) -> BertConfig:
    """A transformers ``BertConfig`` of the given shape (special-token ids of our WordPiece)."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        intermediate_size=size.ffn_size,
        max_position_embeddings=max_length,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=0,
        **extra,
    )


def special_ids_of(tokenizer: Tokenizer | None, need_mask: bool) -> SpecialIds:
    """The special ids of a BERT model's ``tokenizer``; our layout (ids 0..4) while it has none.

    Raises:
        ConfigurationError: The tokenizer lacks a padding, start or end token (or a needed mask token).
    """
    if tokenizer is None:
        return BERT_SPECIAL_IDS
    return find_special_ids(tokenizer, "the model's tokenizer", need_mask=need_mask)


def check_pad_token(model: nn.Module, ids: SpecialIds) -> None:
    """Fail when the tokenizer pads with another id than the model's ``config.pad_token_id``.

    RoBERTa-like models compute position ids from ``input_ids != pad_token_id``: a batch padded
    with another id gives its padding positions real position ids, and a real token whose id is
    the model's ``pad_token_id`` (e.g. RoBERTa's ``<s>`` 0 against a config saying 0) shifts the
    position ids of every token after it.

    Raises:
        ConfigurationError: The two ids differ.
    """
    configured = getattr(model.config, "pad_token_id", None)
    if configured is not None and configured != ids.pad_id:
        raise ConfigurationError(
            f"the tokenizer pads with id {ids.pad_id} but the model's config has pad_token_id={configured}; "
            "give the data module the tokenizer that came with the model (its tokenizer.json)"
        )


def masked_lm_head(model: nn.Module) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]] | None:
    """``(encoder, head)`` of a transformers masked LM, to run the head on chosen positions only; None if unknown.

    ``encoder(input_ids=..., attention_mask=...).last_hidden_state`` is ``(B, T, H)``; ``head`` maps
    ``(M, H)`` hidden states to ``(M, V)`` logits. Known: BERT (``cls``), RoBERTa-style (``lm_head``)
    and DistilBERT (``vocab_transform`` ... ``vocab_projector``).

    Examples:
        >>> encoder, head = masked_lm_head(BertForMaskedLM(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=12)))
        >>> head(torch.zeros(3, 8)).shape
        torch.Size([3, 30])
    """
    if isinstance(getattr(model, "cls", None), nn.Module):
        return model.base_model, model.cls
    if isinstance(getattr(model, "lm_head", None), nn.Module):
        return model.base_model, model.lm_head
    if isinstance(getattr(model, "vocab_projector", None), nn.Module):  # DistilBERT

        def head(hidden: torch.Tensor) -> torch.Tensor:
            hidden = model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
            return model.vocab_projector(hidden)

        return model.base_model, head
    return None


class BertMLM(EfficientModule):
    """Masked-LM pretraining of a BERT encoder, predicting only at the masked positions.

    The encoder runs on the whole sequence, but the vocabulary projection (the costliest layer
    with a 30k vocabulary) runs only on the ~15% masked positions: the hidden states are gathered
    before the head. ``head_on_masked_only=False`` gives the textbook full-sequence head (same
    loss, for comparison). Logs ``train/loss``, ``train/accuracy``, ``val/loss``,
    ``val/accuracy`` and ``val/perplexity``.

    Args:
        vocab_size: Vocabulary size; must equal the tokenizer's (``datamodule.vocab_size``). With
            ``pretrained`` it comes from the weights (and, when given, must equal theirs).
        pretrained: Starting weights: a ``BertMLM`` ``.ckpt``, a directory written by ``save_pretrained``
            (any masked LM ``AutoModelForMaskedLM`` knows: BERT, RoBERTa, DistilBERT, ...; its
            ``tokenizer.json`` becomes the model's tokenizer), or a Hugging Face hub id. A directory
            decides the architecture: leave the size arguments unset (``preset``, ``max_length`` and
            ``dropout`` are then ignored).
        preset: Named size (``tiny``, ``small``, ``base``); fields below override it.
        hidden_size: Width of the encoder.
        num_layers: Number of Transformer blocks.
        num_heads: Attention heads (must divide ``hidden_size``).
        ffn_size: FFN inner width.
        max_length: Longest sequence (position embeddings).
        mlm_probability: Share of tokens masked.
        head_on_masked_only: Gather masked positions before the prediction head.
        dropout: Dropout of hidden states and attention probabilities.
        learning_rate: Peak LR of the default AdamW.
        weight_decay: Weight decay of the default AdamW.
        warmup_fraction: Share of steps of linear LR warmup.
        lr_schedule: ``linear``, ``cosine`` or ``constant`` after warmup.
        seed: Seed of the masking generator (its state is checkpointed).
        model_config: Written by the module into its checkpoints when it started from a directory (the
            transformers config that rebuilds the same architecture without it); leave unset.
        compile: Compile the encoder and the head with ``torch.compile`` at setup, after the techniques' surgery: ``True``
            for Inductor, or a backend name (``"aot_eager"``, ...); checkpoint keys do not change.

    The mask token, and the special tokens that are never masked nor drawn as random replacements,
    come from the model's tokenizer (any BERT- or RoBERTa-style one, see :attr:`special_ids`).

    Examples:
        >>> model = BertMLM(vocab_size=100, preset="tiny")  # with data: vocab_size=datamodule.vocab_size
        >>> ids = torch.randint(5, 100, (2, 16))
        >>> model(ids).shape
        torch.Size([2, 16, 100])
        >>> loss, logits, targets = model._step({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, model.mask_generator)
        >>> logits.shape[0] == targets.shape[0] < ids.numel()  # the head ran on the masked positions only
        True
    """

    needs_tokenizer = True
    task = "masked_lm"
    #: Our module classes whose checkpoints ``pretrained=`` can start this module from.
    pretrained_modules: tuple[str, ...] = ("BertMLM",)

    #: While :meth:`masked_logits` runs the encoder: ``(B, T)`` bool, True where the loss predicts
    #: (``labels != -100``); None otherwise (the protocol of :mod:`lightning_efficient.losses`).
    #: :class:`~lightning_efficient.TokenDropping` reads it to never drop those positions.
    predicted_positions: torch.Tensor | None = None

    def __init__(
        self,
        vocab_size: int | None = None,
        pretrained: str | None = None,
        preset: str = "small",
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        ffn_size: int | None = None,
        max_length: int = 512,
        mlm_probability: float = 0.15,
        head_on_masked_only: bool = True,
        dropout: float = 0.1,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        lr_schedule: str = "linear",
        seed: int = 0,
        model_config: dict[str, Any] | None = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__(learning_rate, weight_decay, warmup_fraction, lr_schedule, compile)
        self.save_hyperparameters()
        if pretrained is None and model_config is None:
            vocab_size = require_argument("vocab_size", vocab_size, "pass datamodule.vocab_size")
        if not 0.0 < mlm_probability < 1.0:
            raise ConfigurationError(f"mlm_probability={mlm_probability} must lie in (0, 1)")
        self.size = resolve_size(preset, hidden_size, num_layers, num_heads, ffn_size)
        self.model = self.build_model(
            "masked_lm",
            lambda shape: BertForMaskedLM(bert_config(self.size, shape["vocab_size"], max_length, dropout)),
            pretrained,
            model_config,
            accepts=self.pretrained_modules,
            shape={**vars(self.size), "vocab_size": vocab_size, "max_length": max_length},
            sizes={"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads, "ffn_size": ffn_size},
        )
        self.settle_vocab_size(vocab_size)
        self.mask_generator = torch.Generator().manual_seed(seed)
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self._special_ids: tuple[Tokenizer | None, SpecialIds] | None = None

    def data_requirements(self) -> dict[str, Any]:
        return {"vocab_size": self.hparams.vocab_size}

    @property
    def special_ids(self) -> SpecialIds:
        """The mask id and the special ids, from the model's tokenizer (ids 0..4, ours, while it has none)."""
        if self._special_ids is None or self._special_ids[0] is not self.tokenizer:
            self._special_ids = (self.tokenizer, special_ids_of(self.tokenizer, need_mask=True))
        return self._special_ids[1]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.tokenizer is not None:
            check_pad_token(self.model, self.special_ids)

    def compile_targets(self) -> list[nn.Module]:
        """The encoder and the masked-LM head: :meth:`masked_logits` calls them apart (the head on masked positions)."""
        parts = masked_lm_head(self.model)
        if parts is None:
            return [self.model]
        return [module for module in parts if isinstance(module, nn.Module)]  # DistilBERT's head is a function

    def mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`mask_tokens` with this model's vocabulary, probability, mask id and special ids."""
        ids = self.special_ids
        return mask_tokens(
            input_ids, attention_mask, generator, self.hparams.vocab_size, self.hparams.mlm_probability,
            mask_token_id=ids.mask_id, special_ids=ids.ids,
        )  # fmt: skip

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits at every position, ``(B, T, V)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def masked_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(M, V)`` and targets ``(M,)`` at the ``M`` positions where ``labels != -100``."""
        keep = labels != -100
        parts = masked_lm_head(self.model)
        with predicting(self, keep):  # (B, T): what a token-dropping technique must keep
            if not self.hparams.head_on_masked_only or parts is None:
                logits = self(input_ids, attention_mask)  # (B, T, V)
                return logits[keep], labels[keep]
            encoder, head = parts
            hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return head(hidden[keep]), labels[keep]  # (M, V): the head sees masked positions only

    def _step(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mask, predict and score a batch: ``(loss, logits (M, V), targets (M,))``."""
        masked, labels = self.mask(batch["input_ids"], batch["attention_mask"], generator)
        logits, targets = self.masked_logits(masked, batch["attention_mask"], labels)
        return softmax_cross_entropy(logits.float(), targets), logits, targets

    def fix_random_inputs(self, batch: dict[str, torch.Tensor]) -> None:
        """Draw this step's masks into the batch (``mlm_input_ids``, ``mlm_labels``) unless they are there.

        The training step then predicts with them, and a teacher (:class:`~lightning_efficient.Distillation`)
        sees the same masked inputs (the loss protocol, rule 4).
        """
        if "mlm_labels" not in batch:
            masked, labels = self.mask(batch["input_ids"], batch["attention_mask"], self.mask_generator)
            batch["mlm_input_ids"], batch["mlm_labels"] = masked, labels

    def distillation_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``(M, V)`` at the batch's predicted positions (drawn by :meth:`fix_random_inputs`), row-major.

        With ``head_on_masked_only`` the vocabulary head runs on those positions only, so a teacher's
        forward costs what the student's masked positions cost.
        """
        self.fix_random_inputs(batch)
        return self.masked_logits(batch["mlm_input_ids"], batch["attention_mask"], batch["mlm_labels"])[0]

    def _importance_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_step`` following the loss protocol: the masks in the batch, importance weights, a teacher's soft targets.

        The loss is the (weighted) token mean of :func:`~lightning_efficient.losses.prediction_losses`.
        """
        self.fix_random_inputs(batch)  # the masks the examples were scored with, or the teacher saw
        masked, labels = batch["mlm_input_ids"], batch["mlm_labels"]
        logits, targets = self.masked_logits(masked, batch["attention_mask"], labels)
        rows, examples = (labels != -100).nonzero()[:, 0], labels.shape[0]
        token_losses = prediction_losses(logits, targets, batch)
        loss = importance_weighted_loss(
            token_losses.new_zeros(examples).index_add(0, rows, token_losses),
            batch,
            tokens=torch.bincount(rows, minlength=examples),
            scores=lambda: row_gradient_norms(logits, targets, rows, examples),
        )
        return loss, logits, targets

    def importance_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per example, the gradient-norm bound of its summed MLM token losses (for importance sampling).

        Draws the examples' masks (stored in the batch as ``mlm_input_ids`` / ``mlm_labels``, so the
        training step trains the drawn examples with the masks they were scored with).
        """
        batch.pop("mlm_labels", None)
        self.fix_random_inputs(batch)
        labels = batch["mlm_labels"]
        logits, targets = self.masked_logits(batch["mlm_input_ids"], batch["attention_mask"], labels)
        return row_gradient_norms(logits, targets, (labels != -100).nonzero()[:, 0], labels.shape[0])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if is_importance_batch(batch) or "mlm_labels" in batch or SOFT_TARGETS_KEY in batch:
            loss, logits, targets = self._importance_step(batch)
        else:
            loss, logits, targets = self._step(batch, self.mask_generator)
        self.log("train/loss", loss, prog_bar=True)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            # The argmax over the vocabulary costs ~1% of a BERT-small step: only on steps that are logged.
            self.log("train/accuracy", (logits.argmax(-1) == targets).float().mean())
        return loss

    def on_validation_epoch_start(self) -> None:
        self._eval_generator = torch.Generator().manual_seed(self.hparams.seed + 1)  # same masks every epoch

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, targets = self._step(batch, self._eval_generator)
        correct = (logits.argmax(-1) == targets).float()
        self.val_loss.update(loss, weight=correct.numel())
        self.val_accuracy.update(correct)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/accuracy", self.val_accuracy)

    def on_validation_epoch_end(self) -> None:
        self.log("val/perplexity", torch.exp(self.val_loss.compute().clamp_max(50.0)))

    on_test_epoch_start = on_validation_epoch_start

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, targets = self._step(batch, self._eval_generator)
        correct = (logits.argmax(-1) == targets).float()
        self.log("test/loss", loss, batch_size=correct.numel())
        self.log("test/accuracy", correct.mean(), batch_size=correct.numel())

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Fill the mask tokens (``[MASK]``, ``<mask>``) of each text; texts without one get 15% masked at random (seeded)."""
        tokenizer = self.require_tokenizer()
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        given = input_ids == self.special_ids.mask_id
        masked, labels = self.mask(
            input_ids, attention_mask, torch.Generator().manual_seed(self.hparams.seed + batch_idx)
        )
        rows_with_mask = given.any(dim=1, keepdim=True)
        masked = torch.where(rows_with_mask, input_ids, masked)
        positions = torch.where(rows_with_mask, given, labels != -100)
        predicted = masked.clone()
        predicted[positions] = self(masked, attention_mask)[positions].argmax(-1)
        results = []
        for row in range(input_ids.shape[0]):
            length = int(attention_mask[row].sum())
            result = {
                "text": batch["text"][row],
                "masked": tokenizer.decode(masked[row, :length].tolist(), skip_special_tokens=False),
                "prediction": tokenizer.decode(predicted[row, :length].tolist()),
            }
            if not bool(rows_with_mask[row]):
                hits = (predicted[row] == input_ids[row])[positions[row]]
                result["accuracy"] = float(hits.float().mean()) if hits.numel() else None
            results.append(result)
        return results

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        write_metadata(checkpoint, mask_generator=self.mask_generator.get_state())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = (read_metadata(checkpoint) or {}).get("mask_generator")
        if state is not None:
            self.mask_generator.set_state(state)


class BertClassifier(TextClassifier):
    """Sequence classification with a BERT encoder, optionally started from pretrained weights.

    With ``pretrained`` a ``BertMLM`` checkpoint gives the encoder weights (embeddings and blocks)
    of a masked-LM pretraining run; the pooler and the classifier start fresh. A ``BertClassifier``
    checkpoint gives every weight, head included (a fine-tuned model continues, e.g. to be
    compressed). Its shapes must match this model's; a mismatch names the differing fields. A ``save_pretrained`` directory (or
    hub id) of any encoder that ``AutoModelForSequenceClassification`` knows gives the architecture
    and the weights; a classifier head it lacks, or one with another label count, starts fresh.
    Logs loss, accuracy and macro F1.

    Args:
        vocab_size: Vocabulary size; must equal the tokenizer's. With ``pretrained`` it comes from
            the weights (and, when given, must equal theirs).
        num_labels: Number of classes; must equal the data's.
        label_names: Class names (for ``predict`` output); default ``["0", "1", ...]``.
        pretrained: Starting weights: a ``BertMLM`` or ``BertClassifier`` ``.ckpt``, a ``save_pretrained``
            directory (its ``tokenizer.json`` becomes the model's tokenizer) or a Hugging Face hub id. A directory
            decides the architecture: leave the size arguments unset.
        pretrained_checkpoint: Deprecated alias of ``pretrained`` (warns).
        preset: Named size; fields below override it.
        hidden_size: Width of the encoder.
        num_layers: Number of Transformer blocks.
        num_heads: Attention heads.
        ffn_size: FFN inner width.
        max_length: Longest sequence (position embeddings).
        dropout: Dropout of hidden states, attention and the classifier.
        learning_rate: Peak LR of the default AdamW.
        weight_decay: Weight decay of the default AdamW.
        warmup_fraction: Share of steps of linear LR warmup.
        lr_schedule: ``linear``, ``cosine`` or ``constant`` after warmup.
        model_config: Written by the module into its checkpoints when it started from a directory;
            leave unset.
        compile: Compile the model with ``torch.compile`` at setup, after the techniques' surgery: ``True``
            for Inductor, or a backend name (``"aot_eager"``, ...); checkpoint keys do not change.

    Examples:
        >>> model = BertClassifier(vocab_size=100, num_labels=2, label_names=["imaginative", "informative"], preset="tiny")
        >>> model(torch.randint(5, 100, (3, 12))).shape
        torch.Size([3, 2])
    """

    #: Our module classes whose checkpoints ``pretrained=`` can start this module from.
    pretrained_modules: tuple[str, ...] = ("BertMLM", "BertClassifier")

    def __init__(
        self,
        vocab_size: int | None = None,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        pretrained: str | None = None,
        pretrained_checkpoint: str | None = None,
        preset: str = "small",
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        ffn_size: int | None = None,
        max_length: int = 512,
        dropout: float = 0.1,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        lr_schedule: str = "linear",
        model_config: dict[str, Any] | None = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__(learning_rate, weight_decay, warmup_fraction, lr_schedule, compile)
        self.save_hyperparameters()
        if pretrained_checkpoint is not None:
            warnings.warn(
                "BertClassifier(pretrained_checkpoint=...) is deprecated; use pretrained=... (it also takes "
                "save_pretrained directories and hub ids)",
                DeprecationWarning,
                stacklevel=2,
            )
            if pretrained is not None and pretrained != pretrained_checkpoint:
                raise ConfigurationError(
                    f"pretrained={pretrained!r} and its deprecated alias pretrained_checkpoint={pretrained_checkpoint!r} "
                    "differ; give pretrained only"
                )
            pretrained = pretrained_checkpoint
        if pretrained is None and model_config is None:
            vocab_size = require_argument("vocab_size", vocab_size, "pass datamodule.vocab_size")
        self.label_names = class_names(num_labels, label_names, "pass datamodule.num_labels")
        num_labels = len(self.label_names)
        self.size = resolve_size(preset, hidden_size, num_layers, num_heads, ffn_size)
        labels = {
            "num_labels": num_labels,
            "id2label": dict(enumerate(self.label_names)),
            "label2id": {name: i for i, name in enumerate(self.label_names)},
        }
        self.model = self.build_model(
            "sequence_classification",
            lambda shape: BertForSequenceClassification(
                bert_config(self.size, shape["vocab_size"], max_length, dropout, **labels)
            ),
            pretrained,
            model_config,
            accepts=self.pretrained_modules,
            shape={**vars(self.size), "vocab_size": vocab_size, "max_length": max_length},
            sizes={"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads, "ffn_size": ffn_size},
            overrides=labels,
        )
        self.settle_vocab_size(vocab_size)
        self.add_classification_metrics(num_labels)

    def load_encoder(self, checkpoint_path: str) -> None:
        """Copy the encoder (embeddings + blocks) of a ``BertMLM`` checkpoint into this model.

        Raises:
            DataError: The file is missing or unreadable.
            CheckpointMismatchError: It is not a ``BertMLM`` checkpoint, or its shapes differ.
        """
        source = resolve_pretrained(checkpoint_path)
        if source.module != "BertMLM":
            raise CheckpointMismatchError(
                f"pretrained {checkpoint_path!r} was written by {source.module}; it must be a BertMLM checkpoint"
            )
        ours = {**vars(self.size), "vocab_size": self.hparams.vocab_size, "max_length": self.hparams.max_length}
        _check_shape(source, ours)
        _copy_checkpoint_weights(self.model, source, whole=False)
        self.initialised_from = source.name

    def data_requirements(self) -> dict[str, Any]:
        return {"vocab_size": self.hparams.vocab_size, "num_labels": self.hparams.num_labels}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.tokenizer is not None:
            check_pad_token(self.model, special_ids_of(self.tokenizer, need_mask=False))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits, ``(B, num_labels)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
