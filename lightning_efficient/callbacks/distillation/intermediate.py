"""Intermediate-layer transfer for students of the teacher's family (TinyBERT-style hidden states and attention).

Besides its logits, a Transformer teacher can teach a shallower, narrower student of its own family
what its layers compute (Jiao et al., TinyBERT; Wang et al., MiniLM): student block ``i`` learns
the output (hidden states) and the self-attention maps of the teacher block it is paired with. This
module holds the pure loss functions and :class:`LayerTransfer`, which captures what it needs with
forward hooks while student and teacher run; :class:`~lightning_efficient.callbacks.distillation.Distillation`
adds :meth:`LayerTransfer.loss` to the step's loss (as :attr:`~lightning_efficient.losses.SoftTargets.extra`).

- **Pairs** (:func:`layer_pairs`): ``"uniform"`` pairs student block ``i`` with teacher block
  ``(i + 1) * T // S - 1`` (:func:`~lightning_efficient.models.students.uniform_layer_map`): with ``S``
  dividing ``T``, the last block of each group of ``k = T / S``, which is TinyBERT's rule for both of
  its targets (attention ``teacher_atts[i*k + k-1]``; hidden states ``teacher_reps[(i+1)*k]``, i.e.
  the output of that same block). A list gives the teacher block of each student block.
- **Hidden states** (:func:`hidden_state_loss`): MSE between the student block's output, projected to
  the teacher's width by a learned ``nn.Linear(H_s, H_t, bias=False)`` when the widths differ
  (TinyBERT's ``fit_dense``), and the teacher block's output, over real (non-pad) tokens.
- **Attention** (:func:`attention_loss`): MSE between the attention *probabilities* of paired blocks,
  padded queries and keys excluded. They are recomputed from the query and key projections
  (:func:`attention_probabilities`), captured with hooks, because HF models under SDPA return no
  attention maps at all.

Differences from TinyBERT's code, on purpose: the attention term compares probabilities, not
pre-softmax scores (see :func:`attention_loss`); the embedding-layer term (TinyBERT's
``teacher_reps[0]``) is not included; terms are averaged over pairs, where TinyBERT sums them
(a weight equal to the number of student blocks gives the sum); the projection has no bias.

Student and teacher must see the same tokens: the same batch, the same padding, the same masked ids
for a masked LM (the loss protocol's ``fix_random_inputs`` draws them into the batch before the
teacher runs). What is supported: one block stack per model, or the encoder stack of an
encoder-decoder (the decoder is not transferred); block outputs batch-first ``(B, T, H)``; for the
attention term, self-attentions with separate query and key ``nn.Linear`` whose scores are
``Q K^T / sqrt(d)`` (BERT, RoBERTa, ELECTRA, DistilBERT, ViT, Marian and BART encoders; no
relative-position bias as in T5 or DeBERTa).

Examples:
    >>> from lightning_efficient import BertClassifier
    >>> _ = torch.manual_seed(0)
    >>> teacher = BertClassifier(vocab_size=60, num_labels=2, preset="tiny", num_layers=4).eval()
    >>> student = BertClassifier(vocab_size=60, num_labels=2, preset="tiny", num_layers=2, hidden_size=24).eval()
    >>> transfer = LayerTransfer(student, teacher)
    >>> transfer.pairs, transfer.projection
    ([(0, 1), (1, 3)], Linear(in_features=24, out_features=32, bias=False))
    >>> transfer.attach()
    >>> ids, mask = torch.randint(5, 60, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    >>> transfer.begin(mask)
    >>> with torch.no_grad():
    ...     _ = teacher(ids, mask)
    >>> _ = student(ids, mask)
    >>> loss = transfer.loss()
    >>> loss.dim(), loss.item() > 0, loss.requires_grad
    (0, True, True)
    >>> transfer.remove()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_efficient.architectures import AttentionView, block_view
from lightning_efficient.blocks import BlockStack, find_block_stacks
from lightning_efficient.errors import ConfigurationError, check_range
from lightning_efficient.models.students import uniform_layer_map

__all__ = [
    "LAYER_MAPS",
    "LayerTransfer",
    "attention_loss",
    "attention_probabilities",
    "hidden_state_loss",
    "layer_pairs",
]

#: The named layer maps (besides an explicit list of teacher blocks, one per student block).
LAYER_MAPS = ("uniform",)


def layer_pairs(student_layers: int, teacher_layers: int, layer_map: str | Sequence[int]) -> list[tuple[int, int]]:
    """The ``(student block, teacher block)`` pairs of an intermediate-layer transfer, 0-based.

    Args:
        student_layers: Blocks of the student (>= 1).
        teacher_layers: Blocks of the teacher (>= 1).
        layer_map: ``"uniform"`` (TinyBERT's rule, :func:`~lightning_efficient.models.students.uniform_layer_map`:
            student block ``i`` -> teacher block ``(i + 1) * T // S - 1``; needs ``S <= T``), or the
            teacher block of each student block (one entry per student block; a teacher block may
            appear twice).

    Returns:
        One pair per student block, in student order.

    Raises:
        ConfigurationError: An unknown name, a ``"uniform"`` map of a student deeper than its
            teacher, a list of the wrong length, or an entry that is not a teacher block.

    Examples:
        >>> layer_pairs(2, 4, "uniform"), layer_pairs(4, 12, "uniform")
        ([(0, 1), (1, 3)], [(0, 2), (1, 5), (2, 8), (3, 11)])
        >>> layer_pairs(2, 4, [0, 3])
        [(0, 0), (1, 3)]
        >>> layer_pairs(2, 4, [0, 4])
        Traceback (most recent call last):
        ...
        lightning_efficient.errors.ConfigurationError: layer map [0, 4] holds [4]; the teacher's blocks are numbered 0 to 3
    """
    for name, count in (("student", student_layers), ("teacher", teacher_layers)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigurationError(f"the {name} has {count!r} blocks; it needs at least one")
    if isinstance(layer_map, str):
        if layer_map not in LAYER_MAPS:
            raise ConfigurationError(
                f"layer map {layer_map!r} is not one of {list(LAYER_MAPS)}; or give a list of teacher blocks, "
                "one per student block"
            )
        if student_layers > teacher_layers:
            raise ConfigurationError(
                f"layer map 'uniform' pairs each student block with a distinct teacher block, but the student has "
                f"{student_layers} blocks and the teacher {teacher_layers}; give a list of teacher blocks instead"
            )
        return list(enumerate(uniform_layer_map(teacher_layers, student_layers)))
    if not isinstance(layer_map, Sequence):
        raise ConfigurationError(
            f"layer map {layer_map!r} must be 'uniform' or a list of teacher blocks, one per student block"
        )
    mapping = list(layer_map)
    if len(mapping) != student_layers:
        raise ConfigurationError(
            f"layer map {mapping} has {len(mapping)} entries but the student has {student_layers} blocks: "
            "give one teacher block per student block"
        )
    bad = [i for i in mapping if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < teacher_layers]
    if bad:
        raise ConfigurationError(
            f"layer map {mapping} holds {bad}; the teacher's blocks are numbered 0 to {teacher_layers - 1}"
        )
    return list(enumerate(mapping))


def _check_lists(student: Sequence[Tensor], teacher: Sequence[Tensor], what: str) -> None:
    if not student or len(student) != len(teacher):
        raise ConfigurationError(
            f"{what}: got {len(student)} student and {len(teacher)} teacher tensors; give one of each per pair "
            "(at least one pair)"
        )


def _token_mask(attention_mask: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor | None:
    """``attention_mask`` as float32 ``(B, T)`` on ``device``, checked against states of ``shape`` ``(B, T, ...)``."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(shape[:2]):
        raise ConfigurationError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the states have (batch, tokens) "
            f"{tuple(shape[:2])}: student and teacher must see the batch's own tokens"
        )
    return attention_mask.to(device=device, dtype=torch.float32)


def hidden_state_loss(
    student_states: list[Tensor],
    teacher_states: list[Tensor],
    projection: nn.Module | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Mean over pairs of the MSE between (projected) student and teacher hidden states, on real tokens, in float32.

    For each pair, ``sum over real tokens and features of (P(h_s) - h_t)^2 / (real tokens * H_t)``,
    where ``P`` is ``projection`` (TinyBERT's ``fit_dense``) or the identity.

    Args:
        student_states: Per pair, ``(B, T, H_s)`` student block outputs (with their graph).
        teacher_states: Per pair, ``(B, T, H_t)`` teacher block outputs.
        projection: Maps ``H_s`` to ``H_t`` (needed when they differ), or None.
        attention_mask: ``(B, T)``, 1 for real tokens, 0 for padding; None: every token is real.

    Returns:
        A float32 scalar.

    Raises:
        ConfigurationError: The lists differ in length or are empty, or the shapes do not fit (the
            message says which: tokens, or widths without a projection).

    Examples:
        >>> student = [torch.tensor([[[1.0, 1.0], [9.0, 9.0]]])]  # one example, 2 tokens, H = 2
        >>> teacher = [torch.tensor([[[0.0, 3.0], [0.0, 0.0]]])]
        >>> float(hidden_state_loss(student, teacher, attention_mask=torch.tensor([[1, 0]])))  # (1 + 4) / 2
        2.5
    """
    _check_lists(student_states, teacher_states, "hidden_state_loss")
    losses = []
    for number, (student, teacher) in enumerate(zip(student_states, teacher_states)):
        if student.shape[:-1] != teacher.shape[:-1]:
            raise ConfigurationError(
                f"hidden states of pair {number}: the student's have shape {tuple(student.shape)}, the teacher's "
                f"{tuple(teacher.shape)}; they must cover the same (batch, tokens): the same batch, and no technique "
                "that drops the student's tokens"
            )
        if projection is not None:
            weight = getattr(projection, "weight", None)
            student = projection(student.to(weight.dtype) if isinstance(weight, Tensor) else student)
        if student.shape[-1] != teacher.shape[-1]:
            raise ConfigurationError(
                f"hidden states of pair {number}: the student's are {student.shape[-1]} wide, the teacher's "
                f"{teacher.shape[-1]}; give a projection from the student's width to the teacher's"
            )
        squared = (student.float() - teacher.to(student.device).float()).square()
        mask = _token_mask(attention_mask, student.shape, student.device)
        if mask is None:
            losses.append(squared.mean())
        else:
            losses.append((squared * mask[..., None]).sum() / (mask.sum() * squared.shape[-1]).clamp(min=1))
    return torch.stack(losses).mean()


def attention_probabilities(query: Tensor, key: Tensor, heads: int, attention_mask: Tensor | None = None) -> Tensor:
    """Self-attention probabilities ``softmax(Q K^T / sqrt(d) + mask)`` from the query and key projections, float32.

    What HF's eager attention computes (and returns with ``output_attentions=True``) before its
    dropout: padded keys get no probability; every query row, a padded one too, is a distribution
    over the real keys.

    Args:
        query: ``(B, T, heads * d)`` the query projection's output.
        key: ``(B, T, heads * d)`` the key projection's output.
        heads: The attention's head count.
        attention_mask: ``(B, T)``, 1 for real tokens, 0 for padding; None: every token is real.

    Returns:
        ``(B, heads, T, T)`` float32 probabilities (query rows, key columns).

    Raises:
        ConfigurationError: The projections' width is not a multiple of ``heads``, or they differ.

    Examples:
        >>> q, k = torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)
        >>> attention_probabilities(q, k, heads=2, attention_mask=torch.tensor([[1, 1, 0]]))[0, 0].tolist()
        [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]
    """
    batch, tokens, width = query.shape
    if width % heads or key.shape != query.shape:
        raise ConfigurationError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} projections: they must have one shape whose "
            f"width is a multiple of the {heads} heads"
        )
    q = query.float().reshape(batch, tokens, heads, width // heads).transpose(1, 2)
    k = key.float().reshape(batch, tokens, heads, width // heads).transpose(1, 2)
    with torch.autocast(query.device.type, enabled=False):  # float32 scores under mixed precision too
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    mask = _token_mask(attention_mask, query.shape, query.device)
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(torch.float32).min)
    return scores.softmax(-1)


def attention_loss(
    student_probs: list[Tensor], teacher_probs: list[Tensor], attention_mask: Tensor | None = None
) -> Tensor:
    """Mean over pairs of the MSE between attention probability maps, padded queries and keys excluded, float32.

    This is the attention transfer of TinyBERT / MiniLM on *probabilities*: TinyBERT's code takes the
    MSE of pre-softmax scores (masked entries zeroed), MiniLM the KL of the distributions. HF-style
    models give only probabilities (``output_attentions=True``, eager attention only; SDPA and flash
    attention give none), and scores are not comparable across models anyway (each has its own
    scale and its own additive mask), so the maps are compared as distributions, which every model
    yields from its query and key projections (:func:`attention_probabilities`). Probabilities are
    at most 1 and each row sums to 1, so this term is much smaller than TinyBERT's score MSE; scale
    it with the attention weight.

    Args:
        student_probs: Per pair, ``(B, heads, T, T)`` student probabilities (with their graph).
        teacher_probs: Per pair, ``(B, heads, T, T)`` teacher probabilities.
        attention_mask: ``(B, T)``, 1 for real tokens, 0 for padding; None: every token is real.

    Returns:
        A float32 scalar.

    Raises:
        ConfigurationError: The lists differ in length or are empty, the head counts differ (named),
            or the maps' shapes otherwise differ.

    Examples:
        >>> student = [torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])]  # B = 1, one head, T = 2
        >>> teacher = [torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])]
        >>> float(attention_loss(student, teacher))  # (1 + 1 + 0.25 + 0.25) / 4
        0.625
        >>> float(attention_loss(student, teacher, torch.tensor([[1, 0]])))  # only query 0, key 0
        1.0
    """
    _check_lists(student_probs, teacher_probs, "attention_loss")
    losses = []
    for number, (student, teacher) in enumerate(zip(student_probs, teacher_probs)):
        if student.dim() != 4 or teacher.dim() != 4:
            raise ConfigurationError(
                f"attention maps of pair {number} have shapes {tuple(student.shape)} and {tuple(teacher.shape)}; "
                "expected (batch, heads, tokens, tokens)"
            )
        if student.shape[1] != teacher.shape[1]:
            raise ConfigurationError(
                f"attention maps of pair {number}: the student has {student.shape[1]} heads, the teacher "
                f"{teacher.shape[1]}; attention transfer compares heads one to one (use the teacher's head count, "
                "or transfer hidden states only)"
            )
        if student.shape != teacher.shape:
            raise ConfigurationError(
                f"attention maps of pair {number} have shapes {tuple(student.shape)} (student) and "
                f"{tuple(teacher.shape)} (teacher); student and teacher must see the same tokens"
            )
        squared = (student.float() - teacher.to(student.device).float()).square()
        mask = _token_mask(attention_mask, torch.Size((student.shape[0], student.shape[2])), student.device)
        if mask is None:
            losses.append(squared.mean())
        else:
            pairs = mask[:, None, :, None] * mask[:, None, None, :]  # (B, 1, T, T): real query and real key
            losses.append((squared * pairs).sum() / (pairs.sum() * squared.shape[1]).clamp(min=1))
    return torch.stack(losses).mean()


# -- the hooks ---------------------------------------------------------------------------------
def _transfer_stack(model: nn.Module, role: str) -> BlockStack:
    """``model``'s one block stack, or the encoder stack of an encoder-decoder."""
    stacks = find_block_stacks(model)  # NoTargetModulesError (a ConfigurationError) when there is none
    if len(stacks) == 1:
        return stacks[0]
    encoders = [stack for stack in stacks if stack.role == "encoder"]
    if len(encoders) == 1 and all(stack.role == "decoder" for stack in stacks if stack is not encoders[0]):
        return encoders[0]
    raise ConfigurationError(
        f"the {role} {type(model).__name__} has {len(stacks)} block stacks "
        f"({', '.join(f'{s.path} ({s.role})' for s in stacks)}); intermediate-layer transfer supports one stack, "
        "or the one encoder stack of an encoder-decoder"
    )


def _self_attention(block: nn.Module, role: str, index: int) -> AttentionView:
    """The first self-attention of ``block`` with separate query and key ``nn.Linear``."""
    for attention in block_view(block).attentions:  # ConfigurationError for a block class without an entry
        if not attention.layout.cross:
            if attention.fused:
                raise ConfigurationError(
                    f"{role} block {index} ({type(block).__name__}) has a fused Q/K/V in-projection "
                    f"({attention.layout.in_proj}); attention transfer needs separate query and key projections: "
                    "use attention_weight=0 (hidden states only)"
                )
            return attention
    raise ConfigurationError(f"{role} block {index} ({type(block).__name__}) has no self-attention")


def _width(block: nn.Module) -> int:
    """The width of the hidden states ``block`` returns (its attention output projection's)."""
    return block_view(block).attentions[0].output.out_features


def _check_batch_first(block: nn.Module, role: str) -> None:
    attention = getattr(block, "self_attn", None)
    if isinstance(attention, nn.MultiheadAttention) and not attention.batch_first:
        raise ConfigurationError(
            f"the {role}'s blocks ({type(block).__name__}) are sequence-first; intermediate-layer transfer needs "
            "batch-first blocks (batch_first=True)"
        )


def _first_tensor(output: Any) -> Tensor:
    """A block's hidden states: its output, or the first element of the tuple it returns (transformers 4)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"a hooked module returned a {type(output).__name__}, not a tensor or a tuple starting with one")


class LayerTransfer:
    """Capture paired student and teacher blocks with forward hooks and give their transfer loss.

    Construction finds each model's block stack (:func:`~lightning_efficient.blocks.find_block_stacks`),
    pairs the blocks (:func:`layer_pairs`), checks head counts when the attention term is on, and
    builds :attr:`projection` when the widths differ. :meth:`attach` registers the hooks, on the
    paired blocks (their outputs) and, when ``attention_weight > 0``, on their query and key
    projections (names and head counts from :func:`~lightning_efficient.architectures.block_view`).

    Each training step: :meth:`begin` with the batch's attention mask (arms the hooks, drops older
    captures), then the teacher's forward (under ``no_grad``) and the student's (with grad) on the
    *same* tokens, in either order; then :meth:`loss`, which also clears the captures and disarms.
    Hooks capture nothing while disarmed, so validation forwards and activation-checkpointing
    recomputations in backward leave nothing behind. A module both student and teacher (one object)
    works too: each side has its own hooks.

    Args:
        student: The student (a LightningModule or any module holding one block stack).
        teacher: The teacher, of the same family: paired blocks' hidden states must have the same
            meaning (same tokenizer, same positions).
        layer_map: ``"uniform"`` or one teacher block per student block (:func:`layer_pairs`).
        hidden_weight: Weight of :func:`hidden_state_loss` (>= 0).
        attention_weight: Weight of :func:`attention_loss` (>= 0); needs the same head count in
            paired blocks, and separate query and key projections.

    Attributes:
        pairs: ``(student block, teacher block)`` pairs.
        projection: ``nn.Linear(H_s, H_t, bias=False)`` when the widths differ and ``hidden_weight > 0``,
            else None. It must train with the student: attach it to the student (under
            :data:`~lightning_efficient.losses.TRAINING_ONLY`) before its optimizer is built.
        last_terms: The detached terms of the last :meth:`loss` (``"hidden"``, ``"attention"``), for logging.

    Raises:
        ConfigurationError: Negative weights, both zero, an invalid ``layer_map``, a model without a
            supported stack, or (with the attention term) different head counts, naming both.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        layer_map: str | Sequence[int] = "uniform",
        hidden_weight: float = 1.0,
        attention_weight: float = 1.0,
    ) -> None:
        check_range("hidden_weight", hidden_weight, low=0.0)
        check_range("attention_weight", attention_weight, low=0.0)
        if hidden_weight == 0 and attention_weight == 0:
            raise ConfigurationError("hidden_weight=0 and attention_weight=0: there is nothing to transfer")
        self.hidden_weight, self.attention_weight = float(hidden_weight), float(attention_weight)
        self.student_stack = _transfer_stack(student, "student")
        self.teacher_stack = _transfer_stack(teacher, "teacher")
        for role, stack in (("student", self.student_stack), ("teacher", self.teacher_stack)):
            _check_batch_first(stack.blocks[0], role)
        self.pairs = layer_pairs(len(self.student_stack), len(self.teacher_stack), layer_map)
        self._views: dict[tuple[str, int], AttentionView] = {}
        if self.attention_weight > 0:
            for s, t in self.pairs:
                mine = _self_attention(self.student_stack.blocks[s], "student", s)
                theirs = _self_attention(self.teacher_stack.blocks[t], "teacher", t)
                if mine.heads != theirs.heads:
                    raise ConfigurationError(
                        f"attention transfer compares heads one to one, but student block {s} has {mine.heads} "
                        f"heads and teacher block {t} has {theirs.heads}; give the student {theirs.heads} heads, "
                        "or use attention_weight=0 (hidden states only)"
                    )
                self._views[("student", s)], self._views[("teacher", t)] = mine, theirs
        self.projection: nn.Linear | None = None
        if self.hidden_weight > 0:
            width_s = _width(self.student_stack.blocks[self.pairs[0][0]])
            width_t = _width(self.teacher_stack.blocks[self.pairs[0][1]])
            if width_s != width_t:
                self.projection = nn.Linear(width_s, width_t, bias=False)
        self.last_terms: dict[str, Tensor] = {}
        self._captures: dict[tuple[str, str, int], Tensor] = {}  # (side, "hidden"/"query"/"key", block) -> tensor
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._armed = False
        self._attention_mask: Tensor | None = None

    # -- hooks --------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def _hook(self, side: str, kind: str, index: int) -> Callable[[nn.Module, Any, Any], None]:
        def capture(module: nn.Module, args: Any, output: Any) -> None:
            if self._armed:
                tensor = _first_tensor(output)
                self._captures[(side, kind, index)] = tensor.detach() if side == "teacher" else tensor

        return capture

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self.attached:
            return
        for side, stack, indices in (
            ("student", self.student_stack, sorted({s for s, _ in self.pairs})),
            ("teacher", self.teacher_stack, sorted({t for _, t in self.pairs})),
        ):
            for index in indices:
                if self.hidden_weight > 0:
                    self._handles.append(stack.blocks[index].register_forward_hook(self._hook(side, "hidden", index)))
                if self.attention_weight > 0:
                    query, key = self._views[(side, index)].projections[:2]
                    self._handles.append(query.register_forward_hook(self._hook(side, "query", index)))
                    self._handles.append(key.register_forward_hook(self._hook(side, "key", index)))

    def remove(self) -> None:
        """Remove every hook and drop the captures; the models are as before :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    # -- one step -----------------------------------------------------------------------------
    def begin(self, attention_mask: Tensor | None) -> None:
        """Start a step: drop older captures, keep the batch's ``(B, T)`` mask (None: no padding), arm the hooks."""
        self._captures.clear()
        self._attention_mask = attention_mask
        self._armed = True

    def clear(self) -> None:
        """Drop the captures and the mask, and disarm the hooks."""
        self._captures.clear()
        self._attention_mask = None
        self._armed = False

    def _captured(self, side: str, kind: str, indices: list[int]) -> list[Tensor]:
        missing = [i for i in indices if (side, kind, i) not in self._captures]
        if missing:
            cause = (
                "the teacher did not run on this step's batch (were its outputs taken from a cache?)"
                if side == "teacher"
                else "the student did not run them on this step's batch (skipped by LayerDrop or ProgressiveStacking?)"
            )
            raise ConfigurationError(
                f"intermediate-layer transfer: nothing captured from {side} blocks {missing} since begin(): {cause}"
            )
        return [self._captures[(side, kind, i)] for i in indices]

    def _probabilities(self, side: str, indices: list[int]) -> list[Tensor]:
        queries, keys = self._captured(side, "query", indices), self._captured(side, "key", indices)
        return [
            attention_probabilities(q, k, self._views[(side, i)].heads, self._attention_mask)
            for q, k, i in zip(queries, keys, indices)
        ]

    def loss(self) -> Tensor:
        """``hidden_weight * hidden_state_loss + attention_weight * attention_loss`` of this step's captures.

        Uses the captures of the last student forward and the last teacher forward since
        :meth:`begin`, then clears them (and disarms the hooks).

        Returns:
            A float32 scalar, with the graph of the student (and of :attr:`projection`).

        Raises:
            ConfigurationError: :meth:`begin` was not called, a side did not run (named), or the
                captures do not fit (see :func:`hidden_state_loss`, :func:`attention_loss`).
        """
        if not self._armed:
            raise ConfigurationError(
                "LayerTransfer.loss() without begin(): call begin(attention_mask) before the step's forwards"
            )
        try:
            student_blocks, teacher_blocks = [s for s, _ in self.pairs], [t for _, t in self.pairs]
            terms: dict[str, Tensor] = {}
            if self.hidden_weight > 0:
                terms["hidden"] = hidden_state_loss(
                    self._captured("student", "hidden", student_blocks),
                    self._captured("teacher", "hidden", teacher_blocks),
                    self.projection,
                    self._attention_mask,
                )
            if self.attention_weight > 0:
                terms["attention"] = attention_loss(
                    self._probabilities("student", student_blocks),
                    self._probabilities("teacher", teacher_blocks),
                    self._attention_mask,
                )
        finally:
            self.clear()
        weights = {"hidden": self.hidden_weight, "attention": self.attention_weight}
        self.last_terms = {name: term.detach() for name, term in terms.items()}
        return torch.stack([weights[name] * term for name, term in terms.items()]).sum()
