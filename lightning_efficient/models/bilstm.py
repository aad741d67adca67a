"""A BiLSTM text classifier: the small student of Tang et al. (2019) for distilling a BERT classifier.

Tang et al., "Distilling Task-Specific Knowledge from BERT into Simple Neural Networks" (arXiv
1903.12136), and the authors' code (castorini/d-bert, ``model/bi_rnn.py``): 300-d word
embeddings, one BiLSTM layer of 150 units per direction, the final forward and backward states
concatenated (300) -> a 200-unit ReLU layer -> dropout -> the classifier. Those are the defaults here.

The student reads the same batches as the BERT teacher (``input_ids``, ``attention_mask``,
``labels`` of our text DataModules): it shares the teacher's WordPiece tokenizer, so a
distillation technique feeds both the same batch. Its word embeddings can start from the
teacher's (``embeddings_from``), copied when the widths match and projected on their principal
directions when the student's are narrower.

Examples:
    >>> model = BiLSTMClassifier(vocab_size=100, num_labels=2, embedding_size=16, hidden_size=8, fc_size=12)
    >>> ids = torch.randint(5, 100, (3, 7))
    >>> mask = torch.ones_like(ids)
    >>> mask[0, 4:] = 0  # right padding: the first text has 4 tokens
    >>> model(ids, mask).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_efficient.errors import CheckpointMismatchError, ConfigurationError, check_int, check_range
from lightning_efficient.models.base import TextClassifier, class_names, require_argument
from lightning_efficient.models.bert import special_ids_of
from lightning_efficient.models.pretrained import describe_source, resolve_pretrained

__all__ = ["BiLSTMClassifier", "principal_projection", "teacher_word_embeddings"]


def teacher_word_embeddings(source: str | Path) -> tuple[torch.Tensor, Tokenizer | None]:
    """The input word embeddings ``(V, H)`` of a BERT-like model, and the tokenizer that comes with them.

    Args:
        source: One of our ``BertClassifier`` / ``BertMLM`` checkpoints (loaded with its class), or a
            directory written by ``save_pretrained`` (loaded with transformers' ``AutoModel``); the
            matrix is the model's ``get_input_embeddings()``.

    Returns:
        ``(weights, tokenizer)``: a detached copy of the matrix, and the checkpoint's tokenizer or the
        directory's ``tokenizer.json`` (None when there is none).

    Raises:
        DataError: Nothing exists at ``source``, or it is not a checkpoint.
        CheckpointMismatchError: A checkpoint not written by our ``BertClassifier`` or ``BertMLM``.

    Examples:
        >>> import tempfile
        >>> from lightning_efficient.models.bert import BertMLM
        >>> directory = tempfile.mkdtemp()
        >>> BertMLM(vocab_size=60, preset="tiny").model.save_pretrained(directory)
        >>> weights, tokenizer = teacher_word_embeddings(directory)
        >>> weights.shape, tokenizer
        (torch.Size([60, 32]), None)
    """
    kind, _ = describe_source(source)
    if kind == "checkpoint":
        from lightning_efficient.models.students import bert_teacher

        teacher = bert_teacher(source)
        model, tokenizer = teacher.model, teacher.tokenizer
    else:
        from transformers import AutoModel

        resolved = resolve_pretrained(source)
        model, tokenizer = AutoModel.from_pretrained(resolved.path, local_files_only=True), resolved.tokenizer()
    return model.get_input_embeddings().weight.detach().clone(), tokenizer


def principal_projection(weights: torch.Tensor, size: int) -> torch.Tensor:
    """The rows of ``weights`` ``(V, H)`` centred and projected on their top ``size`` principal directions.

    Deterministic: the SVD runs in float64, and each direction's sign is fixed so that its
    largest-magnitude component is positive (scikit-learn's ``svd_flip`` convention).

    Examples:
        >>> weights = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
        >>> principal_projection(weights, 1).squeeze(1).tolist()
        [2.0, -2.0, 0.0, 0.0]
    """
    centred = weights.double() - weights.double().mean(dim=0)
    directions = torch.linalg.svd(centred, full_matrices=False).Vh[:size]  # (size, H), by decreasing variance
    largest = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))
    return (centred @ (directions * largest.sign()).T).to(weights.dtype)


class BiLSTMClassifier(TextClassifier):
    """A one-layer BiLSTM text classifier (Tang et al. 2019's distillation student).

    ``forward``: word embeddings -> a bidirectional LSTM over the packed sequences (lengths from the
    ``attention_mask``; right padding, as our DataModules pad) -> the last layer's final forward and
    backward states, concatenated -> ``Linear(2 * hidden_size, fc_size)`` -> ReLU -> dropout ->
    ``Linear(fc_size, num_labels)``. Padding is never read, so a text's logits do not depend on how
    far its batch is padded. The embedding's ``padding_idx`` (the row without gradient) is the pad id
    of the model's tokenizer: the one of ``embeddings_from``, the data module's, or the checkpoint's
    (0, our tokenizers' pad id, while it has none). The data's tokenizer must be the one the
    embeddings came with (checked in ``setup``).

    Training goes through :meth:`~lightning_efficient.models.base.EfficientModule.classification_training_step`
    (the loss protocol: cross-entropy, importance weights, or a teacher's soft targets under
    distillation); :meth:`distillation_logits` gives the logits a distillation technique compares.
    Logs ``train/loss``, ``train/accuracy``, ``val/loss``, ``val/accuracy`` and ``val/f1`` (macro),
    as :class:`~lightning_efficient.BertClassifier` does.

    Args:
        vocab_size: Vocabulary size; must equal the tokenizer's (``datamodule.vocab_size``). With
            ``embeddings_from`` it comes from the teacher (and, when given, must equal its).
        num_labels: Number of classes; must equal the data's.
        label_names: Class names (for ``predict`` output); default ``["0", "1", ...]``.
        embedding_size: Width of the word embeddings (300 in Tang et al.).
        hidden_size: LSTM units per direction (150).
        num_layers: Stacked BiLSTM layers (1); dropout also runs between layers when there are several.
        fc_size: Width of the ReLU layer before the classifier (200).
        dropout: Dropout after the ReLU layer (0.1 in the authors' SST-2 config).
        embeddings_from: Start the word embeddings from a teacher's: one of our ``BertClassifier`` /
            ``BertMLM`` checkpoints or a ``save_pretrained`` directory (see
            :func:`teacher_word_embeddings`). Copied when ``embedding_size`` equals the teacher's
            width, else projected on their top ``embedding_size`` principal directions
            (:func:`principal_projection`). Its tokenizer, when it has one, becomes the model's.
            Checkpoints record it in ``initialised_from`` and store ``embeddings_from=None``: the
            weights are in the checkpoint, and reloading does not need the teacher.
        freeze_embeddings: Keep the word embeddings fixed (the "static" channel of Tang et al.).
        learning_rate: Peak LR of the default AdamW.
        weight_decay: Weight decay of the default AdamW.
        warmup_fraction: Share of steps of linear LR warmup.
        lr_schedule: ``linear``, ``cosine`` or ``constant`` after warmup.
        compile: Compile the module with ``torch.compile`` at setup: ``True`` for Inductor, or a backend name
            (``"aot_eager"``, ...). ``torch.compile`` does not trace RNNs: the LSTM itself runs uncompiled.

    Raises:
        ConfigurationError: An argument is missing or out of range (naming it), or ``embedding_size``
            is wider than the teacher's embeddings.
        CheckpointMismatchError: ``embeddings_from`` has another vocabulary size (naming both), or is a
            checkpoint of another module.

    Examples:
        >>> model = BiLSTMClassifier(vocab_size=50, num_labels=3, embedding_size=12, hidden_size=5, fc_size=7)
        >>> ids = torch.randint(5, 50, (2, 6))
        >>> model.distillation_logits({"input_ids": ids, "attention_mask": torch.ones_like(ids)}).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        vocab_size: int | None = None,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        embedding_size: int = 300,
        hidden_size: int = 150,
        num_layers: int = 1,
        fc_size: int = 200,
        dropout: float = 0.1,
        embeddings_from: str | None = None,
        freeze_embeddings: bool = False,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_fraction: float = 0.0,
        lr_schedule: str = "constant",
        compile: bool | str = False,
    ) -> None:
        super().__init__(learning_rate, weight_decay, warmup_fraction, lr_schedule, compile)
        self.save_hyperparameters()
        for name, value in (
            ("embedding_size", embedding_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
            ("fc_size", fc_size),
        ):
            check_int(name, value, low=1)
        check_range("dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
        if not isinstance(freeze_embeddings, bool):
            raise ConfigurationError(f"freeze_embeddings={freeze_embeddings!r} must be true or false")
        self.label_names = class_names(num_labels, label_names, "pass datamodule.num_labels")
        num_labels = len(self.label_names)
        teacher = None
        if embeddings_from is not None:
            teacher, self.tokenizer = teacher_word_embeddings(embeddings_from)
            if vocab_size is not None and vocab_size != teacher.shape[0]:
                raise CheckpointMismatchError(
                    f"vocab_size={vocab_size} does not match embeddings_from={embeddings_from!r}, whose vocabulary "
                    f"has {teacher.shape[0]} tokens; the student must use the teacher's tokenizer"
                )
            vocab_size = teacher.shape[0]
            self.hparams["vocab_size"] = vocab_size
        vocab_size = require_argument("vocab_size", vocab_size, "pass datamodule.vocab_size")
        check_int("vocab_size", vocab_size, low=1)

        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self._follow_tokenizer()
        self.lstm = nn.LSTM(
            embedding_size,
            hidden_size,
            num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.fc = nn.Linear(2 * hidden_size, fc_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(fc_size, num_labels)
        if teacher is not None:
            self._start_embeddings_from(teacher, str(embeddings_from))
        self.embedding.weight.requires_grad_(not freeze_embeddings)
        self.add_classification_metrics(num_labels)

    def _start_embeddings_from(self, teacher: torch.Tensor, name: str) -> None:
        """Copy (same width) or project (narrower) the teacher's ``(V, H)`` embeddings into ours."""
        size, width = self.hparams.embedding_size, teacher.shape[1]
        if size > width:
            raise ConfigurationError(
                f"embedding_size={size} is wider than the embeddings of embeddings_from={name!r} ({width}); "
                f"set embedding_size to at most {width} (equal copies them, narrower keeps their principal directions)"
            )
        if size > teacher.shape[0]:
            raise ConfigurationError(
                f"embedding_size={size} exceeds the {teacher.shape[0]} tokens of embeddings_from={name!r}: "
                "there are not that many principal directions"
            )
        weights = teacher if size == width else principal_projection(teacher, size)
        with torch.no_grad():
            self.embedding.weight.copy_(weights)
        self.initialised_from = name

    def data_requirements(self) -> dict[str, Any]:
        return {"vocab_size": self.hparams.vocab_size, "num_labels": self.hparams.num_labels}

    def setup(self, stage: str) -> None:
        """Take the data module's tokenizer; fail when it is not the one the embeddings were trained with.

        Raises:
            ConfigurationError: The model already has a tokenizer (from ``embeddings_from`` or a
                checkpoint) and the data's has another vocabulary: its ids would pick the wrong rows.
        """
        own = self.tokenizer
        super().setup(stage)
        if own is not None and self.tokenizer is not own and self.tokenizer.get_vocab() != own.get_vocab():
            self.tokenizer = own
            raise ConfigurationError(
                f"the data module's tokenizer is not the one that came with this model's embeddings "
                f"({self.initialised_from or 'its checkpoint'}): its token ids would pick the wrong embedding rows; "
                "give the data module that tokenizer (tokenizer=<the teacher's checkpoint or tokenizer.json>)"
            )
        self._follow_tokenizer()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._follow_tokenizer()

    def compile_targets(self) -> list[nn.Module]:
        """This module itself (it has no ``self.model``): embeddings and heads compiled, the LSTM run as it is."""
        return [self]

    def _follow_tokenizer(self) -> None:
        """The embedding's ``padding_idx`` (the row that gets no gradient) is the pad id of the model's tokenizer.

        Our tokenizers' 0 while the model has none; e.g. 1 for RoBERTa's, whose id 0 is ``<s>``, a real token.
        """
        self.embedding.padding_idx = special_ids_of(self.tokenizer, need_mask=False).pad_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits, ``(B, num_labels)``, of right-padded ``input_ids`` ``(B, T)``.

        Raises:
            ConfigurationError: ``attention_mask`` is not right padding (a 0 before a 1 in a row).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(dim=1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if not torch.equal(attention_mask.bool(), positions < lengths[:, None]):
            raise ConfigurationError(
                "BiLSTMClassifier reads right-padded batches (real tokens first, then padding); this "
                "attention_mask has padding before real tokens"
            )
        # An empty text (no real token) reads one padding token rather than failing.
        packed = pack_padded_sequence(
            self.embedding(input_ids), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        _, (final, _) = self.lstm(packed)  # (num_layers * 2, B, hidden), back in the batch's order
        features = torch.cat([final[-2], final[-1]], dim=-1)  # the last layer's forward and backward states
        return self.classifier(self.dropout(torch.relu(self.fc(features))))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        hyper_parameters = checkpoint.get("hyper_parameters")
        if hyper_parameters is not None:  # the embeddings are in this checkpoint: reloading needs no teacher
            hyper_parameters["embeddings_from"] = None
