"""Encoder-decoder translation: a Marian or BART model trained with teacher forcing, BLEU on validation.

With ``pretrained`` the model starts from one of our ``Translation`` checkpoints or from a
``save_pretrained`` directory of any model ``AutoModelForSeq2SeqLM`` knows (BART, Marian, ...).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torchmetrics.text import SacreBLEUScore
from transformers import BartConfig, BartForConditionalGeneration, MarianConfig, MarianMTModel, PreTrainedModel

from lightning_efficient.data.tokenizers import MT_SPECIAL_TOKENS
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.losses import (
    SOFT_TARGETS_KEY,
    cross_entropy_gradient_norms,
    importance_weighted_loss,
    is_importance_batch,
    prediction_losses,
)
from lightning_efficient.models.base import EfficientModule, require_argument
from lightning_efficient.models.presets import ModelSize, resolve_size

__all__ = ["ARCHITECTURES", "Translation", "check_special_ids", "seq2seq_model"]

ARCHITECTURES = ("marian", "bart")
PAD_ID, EOS_ID = MT_SPECIAL_TOKENS.index("<pad>"), MT_SPECIAL_TOKENS.index("</s>")


def seq2seq_model(
    architecture: str, size: ModelSize, vocab_size: int, max_length: int, dropout: float
) -> PreTrainedModel:
    """A randomly initialised Marian or BART model of the given shape, using our special-token ids.

    Both stacks get ``size.num_layers`` blocks; source and target share one embedding matrix.

    Examples:
        >>> from lightning_efficient.models.presets import PRESETS
        >>> type(seq2seq_model("marian", PRESETS["tiny"], 101, 64, 0.1)).__name__
        'MarianMTModel'
    """
    common = {
        "vocab_size": vocab_size,
        "d_model": size.hidden_size,
        "encoder_layers": size.num_layers,
        "decoder_layers": size.num_layers,
        "encoder_attention_heads": size.num_heads,
        "decoder_attention_heads": size.num_heads,
        "encoder_ffn_dim": size.ffn_size,
        "decoder_ffn_dim": size.ffn_size,
        "max_position_embeddings": max_length,
        "dropout": dropout,
        "attention_dropout": dropout,
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "forced_eos_token_id": EOS_ID,
    }
    if architecture == "marian":
        return MarianMTModel(MarianConfig(**common, decoder_start_token_id=PAD_ID))
    if architecture == "bart":
        config = BartConfig(**common, bos_token_id=EOS_ID, decoder_start_token_id=EOS_ID, forced_bos_token_id=None)
        return BartForConditionalGeneration(config)
    raise ConfigurationError(f"architecture={architecture!r} is unknown; choose one of: {', '.join(ARCHITECTURES)}")


def check_special_ids(model: PreTrainedModel, tokenizer: Tokenizer) -> None:
    """Fail when ``tokenizer``'s ``<pad>`` or ``</s>`` id differs from ``model``'s ``pad_token_id`` / ``eos_token_id``.

    The model builds its decoder inputs by shifting the labels right behind ``decoder_start_token_id``
    and filling the ignored (-100) positions with ``pad_token_id``, and generation stops at
    ``eos_token_id``: both must be the tokenizer's. Our own models have ``<pad>`` 0 and ``</s>`` 1,
    a public BART ``<pad>`` 1 and ``</s>`` 2.

    Raises:
        ConfigurationError: An id differs (or the tokenizer lacks the token).

    Examples:
        >>> from lightning_efficient.models.presets import PRESETS
        >>> from lightning_efficient.data.tokenizers import train_shared_bpe
        >>> tok = train_shared_bpe(["le chat", "the cat"] * 10, vocab_size=40, show_progress=False)
        >>> check_special_ids(seq2seq_model("bart", PRESETS["tiny"], 40, 16, 0.0), tok)  # ours: 0 and 1
    """
    for token, name in (("<pad>", "pad_token_id"), ("</s>", "eos_token_id")):
        configured, actual = getattr(model.config, name, None), tokenizer.token_to_id(token)
        if configured is not None and configured != actual:
            raise ConfigurationError(
                f"the tokenizer has {token!r} at id {actual} but the model's config has {name}={configured}; "
                "give the data module the tokenizer that came with the model (its tokenizer.json), or, for a new "
                f"model, a tokenizer with {list(MT_SPECIAL_TOKENS)} at ids 0..{len(MT_SPECIAL_TOKENS) - 1}"
            )


class Translation(EfficientModule):
    """Sequence-to-sequence translation with teacher forcing, greedy or beam generation and BLEU.

    Training minimises label-smoothed cross-entropy of the target given the shifted target
    (teacher forcing). Validation logs the loss on every batch and SacreBLEU (13a tokenisation)
    on the first ``bleu_batches`` batches, decoded greedily by default (``val_num_beams``);
    ``test`` and ``predict`` use ``num_beams``.

    Args:
        vocab_size: Shared source/target vocabulary size; must equal the tokenizer's. With
            ``pretrained`` it comes from the weights (and, when given, must equal theirs).
        pretrained: Starting weights: a ``Translation`` ``.ckpt``, a ``save_pretrained`` directory of
            a sequence-to-sequence model (its ``tokenizer.json`` becomes the model's tokenizer; a
            Marian sentencepiece tokenizer needs the ``sentencepiece`` extra) or a Hugging Face hub
            id. A directory decides the architecture: leave the size arguments unset
            (``architecture``, ``preset`` and ``dropout`` are then ignored).
        architecture: ``marian`` or ``bart``.
        preset: Named size; fields below override it (per stack).
        hidden_size: Model width.
        num_layers: Blocks in each of the encoder and the decoder.
        num_heads: Attention heads.
        ffn_size: FFN inner width.
        max_length: Longest source / generated target (position embeddings).
        label_smoothing: Label smoothing of the training loss.
        num_beams: Beam width for test and predict (1 = greedy).
        val_num_beams: Beam width for validation BLEU.
        bleu_batches: Validation batches decoded for BLEU each epoch (None: all).
        dropout: Dropout of hidden states and attention.
        learning_rate: Peak LR of the default AdamW.
        weight_decay: Weight decay of the default AdamW.
        warmup_fraction: Share of steps of linear LR warmup.
        lr_schedule: ``linear``, ``cosine`` or ``constant`` after warmup.
        model_config: Written by the module into its checkpoints when it started from a directory;
            leave unset.
        compile: Compile the model with ``torch.compile`` at setup, after the techniques' surgery: ``True``
            for Inductor, or a backend name (``"aot_eager"``, ...); checkpoint keys do not change.

    Examples:
        >>> model = Translation(vocab_size=100, preset="tiny")  # with data: vocab_size=datamodule.vocab_size
        >>> source, target = torch.randint(3, 100, (2, 9)), torch.randint(3, 100, (2, 7))
        >>> model(source, torch.ones_like(source), target).shape  # teacher-forced logits
        torch.Size([2, 7, 100])
    """

    needs_tokenizer = True
    task = "seq2seq"
    #: Our module classes whose checkpoints ``pretrained=`` can start this module from.
    pretrained_modules: tuple[str, ...] = ("Translation",)

    def __init__(
        self,
        vocab_size: int | None = None,
        pretrained: str | None = None,
        architecture: str = "marian",
        preset: str = "small",
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        ffn_size: int | None = None,
        max_length: int = 128,
        label_smoothing: float = 0.1,
        num_beams: int = 4,
        val_num_beams: int = 1,
        bleu_batches: int | None = 4,
        dropout: float = 0.1,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        lr_schedule: str = "linear",
        model_config: dict[str, Any] | None = None,
        compile: bool | str = False,
    ) -> None:
        super().__init__(learning_rate, weight_decay, warmup_fraction, lr_schedule, compile)
        self.save_hyperparameters()
        if pretrained is None and model_config is None:
            vocab_size = require_argument("vocab_size", vocab_size, "pass datamodule.vocab_size")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigurationError(f"label_smoothing={label_smoothing} must lie in [0, 1)")
        for name, beams in (("num_beams", num_beams), ("val_num_beams", val_num_beams)):
            if beams < 1:
                raise ConfigurationError(f"{name}={beams} must be >= 1")
        if bleu_batches is not None and bleu_batches < 0:
            raise ConfigurationError(f"bleu_batches={bleu_batches} must be >= 0 or None")
        self.size = resolve_size(preset, hidden_size, num_layers, num_heads, ffn_size)
        self.model = self.build_model(
            "seq2seq",
            lambda shape: seq2seq_model(architecture, self.size, shape["vocab_size"], max_length, dropout),
            pretrained,
            model_config,
            accepts=self.pretrained_modules,
            shape={**vars(self.size), "vocab_size": vocab_size, "max_length": max_length, "architecture": architecture},
            sizes={"hidden_size": hidden_size, "num_layers": num_layers, "num_heads": num_heads, "ffn_size": ffn_size},
        )
        self.settle_vocab_size(vocab_size)
        self.val_bleu = SacreBLEUScore(tokenize="13a")
        self.test_bleu = SacreBLEUScore(tokenize="13a")

    def setup(self, stage: str) -> None:
        """Take the data's tokenizer (:class:`EfficientModule`) and check its padding and end ids against the model's."""
        super().setup(stage)
        if self.tokenizer is not None:
            check_special_ids(self.model, self.tokenizer)

    def data_requirements(self) -> dict[str, Any]:
        return {"vocab_size": self.hparams.vocab_size}

    def count_batch(self, batch: dict[str, Any]) -> tuple[int, int | torch.Tensor]:
        """``(pairs, source + target tokens)``: the non-pad tokens the encoder and decoder process."""
        return batch["input_ids"].shape[0], batch["attention_mask"].sum() + (batch["labels"] != -100).sum()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(B, T_target, V)``; ``labels`` are shifted right into the decoder."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits

    def _loss(self, batch: dict[str, Any], label_smoothing: float) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return F.cross_entropy(
            logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, label_smoothing=label_smoothing
        )

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_beams: int = 1) -> list[str]:
        """Translate a batch, greedy (``num_beams=1``) or with beam search; returns decoded strings.

        Generation runs uncompiled under ``compile``: each decoding step has other shapes (the growing
        key/value cache), so a compiled model would recompile until torch gives up on it.
        """
        with torch.compiler.set_stance("force_eager"):
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                num_beams=num_beams,
                do_sample=False,
                max_new_tokens=self.hparams.max_length,
            )
        return self.require_tokenizer().decode_batch(output.tolist(), skip_special_tokens=True)

    def importance_scores(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per pair, the gradient-norm bound of its summed target-token losses (for importance sampling)."""
        logits = self(batch["input_ids"], batch["attention_mask"], batch["labels"])
        return cross_entropy_gradient_norms(logits, batch["labels"], token_mean=False)

    def distillation_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Teacher-forced logits ``(M, V)`` at the batch's target tokens, row-major (the loss protocol, rule 4)."""
        labels = batch["labels"]
        return self(batch["input_ids"], batch["attention_mask"], labels)[labels != -100]

    def _protocol_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of a batch with importance weights or a teacher's soft targets (word-level distillation).

        The (weighted) token mean of :func:`~lightning_efficient.losses.prediction_losses` at the target tokens.
        """
        labels = batch["labels"]
        logits = self(batch["input_ids"], batch["attention_mask"], labels)
        keep = labels != -100
        token_losses = prediction_losses(logits[keep], labels[keep], batch, self.hparams.label_smoothing)
        return importance_weighted_loss(
            token_losses.new_zeros(labels.shape[0]).index_add(0, keep.nonzero()[:, 0], token_losses),
            batch,
            tokens=keep.sum(-1),
            scores=lambda: cross_entropy_gradient_norms(logits, labels, token_mean=False),
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if is_importance_batch(batch) or SOFT_TARGETS_KEY in batch:
            loss = self._protocol_loss(batch)
        else:
            loss = self._loss(batch, self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        size = len(batch["labels"])
        self.log("val/loss", self._loss(batch, 0.0), prog_bar=True, batch_size=size)
        limit = self.hparams.bleu_batches
        if limit is None or batch_idx < limit:
            hypotheses = self.generate(batch["input_ids"], batch["attention_mask"], self.hparams.val_num_beams)
            self.val_bleu.update(hypotheses, [[t] for t in batch["target_text"]])
            self.log("val/bleu", self.val_bleu, prog_bar=True, batch_size=size)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        size = len(batch["labels"])
        self.log("test/loss", self._loss(batch, 0.0), batch_size=size)
        hypotheses = self.generate(batch["input_ids"], batch["attention_mask"], self.hparams.num_beams)
        self.test_bleu.update(hypotheses, [[t] for t in batch["target_text"]])
        self.log("test/bleu", self.test_bleu, batch_size=size)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Beam-search translation of each source sentence."""
        translations = self.generate(batch["input_ids"], batch["attention_mask"], self.hparams.num_beams)
        return [{"source": s, "translation": t} for s, t in zip(batch["source_text"], translations)]
