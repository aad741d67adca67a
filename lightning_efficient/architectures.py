"""One table of facts about Transformer blocks, read by every technique that looks inside a block.

Each entry describes one block class: where its attention projections are (query, key, value and
output; or one fused in-projection, as in ``nn.MultiheadAttention.in_proj_weight``), which
attribute holds the head count and the head size, the FFN's two projections, the norms and the
residual layout (post-LN as in BERT, pre-LN as in ViT). A second, smaller table describes whole
models: the word embeddings and the output head, and whether they are tied.

Structured pruning (heads, FFN neurons), the tensor-parallel plans, quantization, activation
checkpointing and the initialisation schemes all read these entries, so a user describes a block of
their own once, with :func:`register_architecture`, and every technique works on it; a user-registered
block class is also found by :func:`~lightning_efficient.blocks.find_block_stacks` wherever a
``nn.ModuleList`` holds it.

A layer wrapped by a peft adapter (:class:`~lightning_efficient.callbacks.ParameterEfficientTuning`) is seen
as the layer it adapts, so techniques that read the table work on a model with adapters.

Known today: HF BERT and the encoders that share its block layout (``BertLayer``, ``RobertaLayer``,
``XLMRobertaLayer``, ``CamembertLayer``, ``ElectraLayer``), DistilBERT (``TransformerBlock``), ViT
(``ViTLayer``, transformers 4 and 5), Marian and BART (encoder and decoder layers),
``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``.

Examples:
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self, width: int = 8, heads: int = 2) -> None:
    ...         super().__init__()
    ...         self.heads, self.head_size = heads, width // heads
    ...         self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
    ...         self.up, self.down = nn.Linear(width, 3 * width), nn.Linear(3 * width, width)
    ...         self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
    >>> _ = register_architecture(
    ...     Block,
    ...     attentions=[AttentionLayout(path="", query="q", key="k", value="v", output="o", heads="heads",
    ...                                 head_size="head_size")],
    ...     ffn=FeedForwardLayout("up", "down"), norms=("norm1", "norm2"), residual="pre",
    ... )
    >>> view = block_view(Block())
    >>> [(a.heads, a.head_size, len(a.projections)) for a in view.attentions], view.ffn.width, view.residual
    ([(2, 4, 3)], 24, 'pre')
    >>> unregister_architecture(Block)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from lightning_efficient.errors import ConfigurationError, check_choice

__all__ = [
    "RESIDUAL_LAYOUTS",
    "AttentionLayout",
    "AttentionView",
    "BlockArchitecture",
    "BlockView",
    "FeedForwardLayout",
    "FeedForwardView",
    "ModelArchitecture",
    "architecture_of",
    "attention_views",
    "block_view",
    "known_block_classes",
    "model_architecture_of",
    "register_architecture",
    "register_model_architecture",
    "registered_block_classes",
    "unregister_architecture",
]

#: Residual layouts: ``"post"`` (x + F(x), then norm: BERT, Marian, BART), ``"pre"`` (x + F(norm(x)): ViT).
RESIDUAL_LAYOUTS = ("post", "pre")


@dataclass(frozen=True)
class AttentionLayout:
    """Where one attention of a block keeps its parts. Paths are dotted attribute paths.

    Attributes:
        path: The attention module, relative to the block (``""``: the block itself).
        query: The query projection (an ``nn.Linear``), relative to the attention module.
        key: The key projection, relative to the attention module.
        value: The value projection, relative to the attention module.
        output: The output projection, relative to the *block* (BERT keeps it outside the attention module).
        heads: Attribute of the attention module holding the number of heads.
        head_size: Attribute of the attention module holding the features per head (None: the output
            projection's input width divided by the head count).
        in_proj: For a fused in-projection: the attention module's parameter holding Q, K and V
            stacked (``"in_proj_weight"`` of ``nn.MultiheadAttention``); then ``query``/``key``/``value``
            are None. Techniques that need separate projections (head pruning, tensor parallelism)
            refuse such an attention by name.
        width_attribute: Attribute of the attention module holding ``heads * head_size`` that must follow
            the head count when heads are removed (HF BERT's ``all_head_size``), or None.
        cross: Cross-attention (keys and values from the encoder's output).
        positional_inputs: How many positional arguments the block passes to the attention module
            (a sequence-parallel plan gathers the first of them).
    """

    path: str
    query: str | None = None
    key: str | None = None
    value: str | None = None
    output: str = "out_proj"
    heads: str = "num_heads"
    head_size: str | None = "head_dim"
    in_proj: str | None = None
    width_attribute: str | None = None
    cross: bool = False
    positional_inputs: int = 1

    def __post_init__(self) -> None:
        separate = [self.query, self.key, self.value]
        if self.in_proj is None and not all(separate):
            raise ConfigurationError(
                f"AttentionLayout(path={self.path!r}) needs query, key and value (got {separate}) or a fused in_proj"
            )
        if self.in_proj is not None and any(separate):
            raise ConfigurationError(
                f"AttentionLayout(path={self.path!r}) has in_proj={self.in_proj!r}: leave query/key/value None"
            )

    def projection_paths(self) -> list[str]:
        """The Q, K, V projection paths relative to the block (empty for a fused in-projection)."""
        if self.in_proj is not None:
            return []
        return [_join(self.path, name) for name in (self.query, self.key, self.value) if name]


@dataclass(frozen=True)
class FeedForwardLayout:
    """The two projections of a block's FFN (relative to the block): ``first`` widens, ``second`` narrows."""

    first: str
    second: str


@dataclass(frozen=True)
class BlockArchitecture:
    """The facts about one block class that techniques need.

    Attributes:
        attentions: Its attention modules (self-attention first, then cross-attention).
        ffn: Its feed-forward network, or None.
        norms: Its normalisation layers, relative to the block, in the order they run.
        residual: ``"post"`` or ``"pre"`` (see :data:`RESIDUAL_LAYOUTS`).
        residual_attribute: A bool attribute of the block that says pre-LN when True
            (``nn.TransformerEncoderLayer.norm_first``); overrides ``residual`` per instance.
        applies: A test on a block instance for classes whose layout changed between library versions
            (transformers 4 and 5 lay out ``ViTLayer`` differently); the first entry that applies wins.
    """

    attentions: tuple[AttentionLayout, ...] = ()
    ffn: FeedForwardLayout | None = None
    norms: tuple[str, ...] = ()
    residual: str = "post"
    residual_attribute: str | None = None
    applies: Callable[[nn.Module], bool] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_choice("residual", self.residual, RESIDUAL_LAYOUTS)


@dataclass(frozen=True)
class ModelArchitecture:
    """Where a whole model keeps its vocabulary modules (paths relative to the model).

    Attributes:
        embeddings: The word-embedding tables (several when an encoder-decoder shares one table).
        heads: The output heads over the vocabulary (empty for a classifier).
        tied: Whether the heads share their weight with the first embedding.
    """

    embeddings: tuple[str, ...]
    heads: tuple[str, ...] = ()
    tied: bool = False


# -- views: an architecture resolved on a block instance -----------------------------------------
@dataclass
class AttentionView:
    """One attention of a block instance, resolved: the modules themselves and the sizes.

    Attributes:
        layout: The table entry it was resolved from.
        path: The attention module's path in the block.
        module: The attention module (holds the head-count attribute).
        projections: The Q, K, V ``nn.Linear`` (empty when fused).
        output: The output projection.
        heads: Number of heads.
        head_size: Features per head.
    """

    layout: AttentionLayout
    path: str
    module: nn.Module
    projections: list[nn.Linear]
    output: nn.Linear
    heads: int
    head_size: int

    @property
    def fused(self) -> bool:
        """Whether Q, K and V are one fused parameter (``in_proj``)."""
        return self.layout.in_proj is not None


@dataclass
class FeedForwardView:
    """The FFN of a block instance: rows of ``first`` and columns of ``second`` are its neurons."""

    layout: FeedForwardLayout
    first: nn.Linear
    second: nn.Linear

    @property
    def width(self) -> int:
        return self.second.in_features


@dataclass
class BlockView:
    """A block instance with its architecture resolved (see :func:`block_view`)."""

    block: nn.Module
    architecture: BlockArchitecture
    attentions: list[AttentionView]
    ffn: FeedForwardView | None
    norms: list[nn.Module]
    residual: str


# -- the registry ------------------------------------------------------------------------------
#: Entries by block class *name* (built-in: transformers classes are matched without importing them)
#: or by class object (registered by users; matched along the MRO).
_BLOCKS: dict[str | type, list[BlockArchitecture]] = {}
_MODELS: dict[str | type, ModelArchitecture] = {}


def register_architecture(
    block_class: type | str,
    architecture: BlockArchitecture | None = None,
    *,
    attentions: Sequence[AttentionLayout] = (),
    ffn: FeedForwardLayout | None = None,
    norms: Sequence[str] = (),
    residual: str = "post",
    residual_attribute: str | None = None,
    applies: Callable[[nn.Module], bool] | None = None,
    replace: bool = False,
) -> BlockArchitecture:
    """Describe a block class once; pruning, tensor parallelism, quantization, activation checkpointing and
    the initialisation schemes then work on it, and the block locator finds lists of it.

    Args:
        block_class: The class (matched for its subclasses too) or a class name.
        architecture: A ready :class:`BlockArchitecture`; otherwise built from the keywords.
        attentions: The attention layouts (see :class:`AttentionLayout`).
        ffn: The FFN layout.
        norms: Norm paths in the block.
        residual: ``"post"`` or ``"pre"``.
        residual_attribute: Bool attribute meaning pre-LN when True (per instance).
        applies: Optional test on an instance (see :class:`BlockArchitecture`).
        replace: Replace the class's existing entries instead of adding a variant.

    Returns:
        The registered architecture.

    Raises:
        ConfigurationError: The class is already registered (pass ``replace=True``), or a layout is invalid.
    """
    if architecture is None:
        architecture = BlockArchitecture(tuple(attentions), ffn, tuple(norms), residual, residual_attribute, applies)
    if block_class in _BLOCKS and not replace and applies is None:
        name = block_class if isinstance(block_class, str) else block_class.__name__
        raise ConfigurationError(f"{name} already has an architecture entry; pass replace=True to replace it")
    if replace:
        _BLOCKS.pop(block_class, None)
    _BLOCKS.setdefault(block_class, []).append(architecture)
    return architecture


def unregister_architecture(block_class: type | str) -> None:
    """Remove a class's entries (e.g. at the end of a test)."""
    _BLOCKS.pop(block_class, None)


def register_model_architecture(model_class: type | str, architecture: ModelArchitecture) -> None:
    """Describe where a model class keeps its word embeddings and output head (for vocab-parallel plans)."""
    _MODELS[model_class] = architecture


def _entries(cls: type) -> list[BlockArchitecture]:
    for klass in cls.__mro__:
        if klass in _BLOCKS:
            return _BLOCKS[klass]
    return _BLOCKS.get(cls.__name__, [])


def architecture_of(block: nn.Module) -> BlockArchitecture | None:
    """The architecture entry of ``block`` (by class, then class name; the first variant that applies), or None.

    Examples:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2)
        >>> architecture_of(layer).ffn
        FeedForwardLayout(first='linear1', second='linear2')
        >>> architecture_of(nn.Linear(2, 2)) is None
        True
    """
    for entry in _entries(type(block)):
        if entry.applies is None or entry.applies(block):
            return entry
    return None


def model_architecture_of(model: nn.Module) -> ModelArchitecture | None:
    """The vocabulary layout of ``model``'s class, or None."""
    for klass in type(model).__mro__:
        if klass in _MODELS:
            return _MODELS[klass]
    return _MODELS.get(type(model).__name__)


def registered_block_classes() -> tuple[type, ...]:
    """The block classes users registered (not the built-in entries), for the block locator."""
    return tuple(key for key in _BLOCKS if isinstance(key, type) and key not in _BUILT_IN)


def known_block_classes() -> list[str]:
    """Names of every block class with an entry (for error messages)."""
    return sorted({key if isinstance(key, str) else key.__name__ for key in _BLOCKS})


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def _get(module: nn.Module, path: str) -> Any:
    """The submodule at ``path``; a layer that a peft adapter wraps gives the layer it adapts (its ``base_layer``)."""
    for name in path.split(".") if path else ():
        module = getattr(module, name, None)
        if module is None:
            return None
    if hasattr(module, "adapter_layer_names") and hasattr(module, "get_base_layer"):
        return module.get_base_layer()
    return module


def _describe(block: nn.Module, what: str) -> ConfigurationError:
    return ConfigurationError(
        f"{type(block).__name__}: {what}; fix its entry with register_architecture({type(block).__name__}, ..., replace=True)"
    )


def block_view(block: nn.Module) -> BlockView:
    """Resolve ``block``'s architecture entry on the instance: the modules and sizes it names.

    Raises:
        ConfigurationError: ``block``'s class has no entry (the message lists the known classes), or a
            path of its entry does not lead to the expected module.

    Examples:
        >>> view = block_view(nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=5, norm_first=True))
        >>> view.attentions[0].fused, view.attentions[0].heads, view.ffn.width, view.residual
        (True, 2, 5, 'pre')
    """
    architecture = architecture_of(block)
    if architecture is None:
        raise ConfigurationError(
            f"{type(block).__name__} has no architecture entry; known block classes: {', '.join(known_block_classes())}; "
            "describe it once with lightning_efficient.architectures.register_architecture"
        )
    attentions = []
    for layout in architecture.attentions:
        module = _get(block, layout.path)
        if not isinstance(module, nn.Module):
            raise _describe(block, f"attention path {layout.path!r} is not a submodule")
        output = _get(block, layout.output)
        if not isinstance(output, nn.Linear):
            raise _describe(block, f"attention output {layout.output!r} is not an nn.Linear")
        projections = [_get(block, path) for path in layout.projection_paths()]
        if not all(isinstance(p, nn.Linear) for p in projections):
            raise _describe(block, f"projections {layout.projection_paths()} are not all nn.Linear")
        heads = getattr(module, layout.heads, None)
        if not isinstance(heads, int):
            raise _describe(block, f"attention {layout.path!r} has no int attribute {layout.heads!r} (the head count)")
        head_size = getattr(module, layout.head_size, None) if layout.head_size else output.in_features // heads
        if not isinstance(head_size, int):
            raise _describe(
                block, f"attention {layout.path!r} has no int attribute {layout.head_size!r} (the head size)"
            )
        attentions.append(AttentionView(layout, layout.path, module, projections, output, heads, head_size))
    ffn = None
    if architecture.ffn is not None:
        first, second = _get(block, architecture.ffn.first), _get(block, architecture.ffn.second)
        if not (isinstance(first, nn.Linear) and isinstance(second, nn.Linear)):
            raise _describe(block, f"FFN {architecture.ffn} does not lead to two nn.Linear")
        ffn = FeedForwardView(architecture.ffn, first, second)
    norms = [_get(block, path) for path in architecture.norms]
    if not all(isinstance(norm, nn.Module) for norm in norms):
        raise _describe(block, f"norms {architecture.norms} are not all submodules")
    residual = architecture.residual
    if architecture.residual_attribute is not None:
        residual = "pre" if getattr(block, architecture.residual_attribute, False) else "post"
    return BlockView(block, architecture, attentions, ffn, norms, residual)


# -- the built-in entries ----------------------------------------------------------------------
def attention_views(model: nn.Module) -> dict[str, AttentionView]:
    """Every attention with separate Q, K, V projections in the known blocks of ``model``, by module path.

    Examples:
        >>> from transformers import BertConfig, BertModel
        >>> model = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
        >>> list(attention_views(model))
        ['encoder.layer.0.attention.self']
    """
    found = {}
    for block_name, block in model.named_modules():
        if architecture_of(block) is not None:
            for attention in block_view(block).attentions:
                if not attention.fused:
                    found[_join(block_name, attention.path)] = attention
    return found


def _hf_self_attention(path: str) -> AttentionLayout:
    """The self-attention of HF BERT and transformers-4 ViT blocks (``all_head_size`` follows the heads)."""
    return AttentionLayout(
        path,
        "query",
        "key",
        "value",
        output="attention.output.dense",
        heads="num_attention_heads",
        head_size="attention_head_size",
        width_attribute="all_head_size",
    )


_HF_FFN = FeedForwardLayout("intermediate.dense", "output.dense")
_BERT = BlockArchitecture(
    attentions=(_hf_self_attention("attention.self"),),
    ffn=_HF_FFN,
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    residual="post",
)
_DISTILBERT = BlockArchitecture(  # DistilBERT's TransformerBlock: post-LN like BERT, its own names
    attentions=(
        AttentionLayout(
            "attention",
            "q_lin",
            "k_lin",
            "v_lin",
            output="attention.out_lin",
            heads="n_heads",
            head_size="attention_head_size",
        ),
    ),
    ffn=FeedForwardLayout("ffn.lin1", "ffn.lin2"),
    norms=("sa_layer_norm", "output_layer_norm"),
    residual="post",
    applies=lambda block: hasattr(block, "sa_layer_norm"),  # the class name is generic: check the layout
)
_VIT5 = BlockArchitecture(  # transformers 5
    attentions=(
        AttentionLayout(
            "attention",
            "q_proj",
            "k_proj",
            "v_proj",
            output="attention.o_proj",
            heads="num_attention_heads",
            head_size="head_dim",
            positional_inputs=2,
        ),
    ),
    ffn=FeedForwardLayout("mlp.fc1", "mlp.fc2"),
    norms=("layernorm_before", "layernorm_after"),
    residual="pre",
    applies=lambda block: hasattr(block, "mlp"),
)
_VIT4 = BlockArchitecture(  # transformers 4
    attentions=(_hf_self_attention("attention.attention"),),
    ffn=_HF_FFN,
    norms=("layernorm_before", "layernorm_after"),
    residual="pre",
    applies=lambda block: not hasattr(block, "mlp"),
)


def _encoder_and_decoder(
    self_attention: AttentionLayout,
    cross_attention: AttentionLayout,
    ffn: FeedForwardLayout,
    norms: tuple[str, ...],
    decoder_norms: tuple[str, ...],
    **residual: str,
) -> tuple[BlockArchitecture, BlockArchitecture]:
    """The entries of an encoder block and of its decoder block, which adds a cross-attention (and a norm).

    ``residual`` is the ``residual`` or ``residual_attribute`` of both (see :class:`BlockArchitecture`).
    """
    encoder = BlockArchitecture((self_attention,), ffn, norms, **residual)
    return encoder, replace(encoder, attentions=(self_attention, cross_attention), norms=decoder_norms)


_SEQ2SEQ_ENCODER, _SEQ2SEQ_DECODER = _encoder_and_decoder(  # Marian, BART
    AttentionLayout("self_attn", "q_proj", "k_proj", "v_proj", output="self_attn.out_proj"),
    AttentionLayout("encoder_attn", "q_proj", "k_proj", "v_proj", output="encoder_attn.out_proj", cross=True),
    FeedForwardLayout("fc1", "fc2"),
    norms=("self_attn_layer_norm", "final_layer_norm"),
    decoder_norms=("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"),
    residual="post",
)
_TORCH_ENCODER, _TORCH_DECODER = _encoder_and_decoder(  # nn.TransformerEncoderLayer, nn.TransformerDecoderLayer
    AttentionLayout("self_attn", in_proj="in_proj_weight", output="self_attn.out_proj"),
    AttentionLayout("multihead_attn", in_proj="in_proj_weight", output="multihead_attn.out_proj", cross=True),
    FeedForwardLayout("linear1", "linear2"),
    norms=("norm1", "norm2"),
    decoder_norms=("norm1", "norm2", "norm3"),
    residual_attribute="norm_first",
)
for _name, _entry in (
    ("BertLayer", _BERT),
    ("RobertaLayer", _BERT),
    ("XLMRobertaLayer", _BERT),
    ("CamembertLayer", _BERT),
    ("ElectraLayer", _BERT),
    ("TransformerBlock", _DISTILBERT),
    ("ViTLayer", _VIT5),
    ("ViTLayer", _VIT4),
    ("MarianEncoderLayer", _SEQ2SEQ_ENCODER),
    ("BartEncoderLayer", _SEQ2SEQ_ENCODER),
    ("MarianDecoderLayer", _SEQ2SEQ_DECODER),
    ("BartDecoderLayer", _SEQ2SEQ_DECODER),
):
    _BLOCKS.setdefault(_name, []).append(_entry)
_BLOCKS[nn.TransformerEncoderLayer] = [_TORCH_ENCODER]
_BLOCKS[nn.TransformerDecoderLayer] = [_TORCH_DECODER]
_BUILT_IN = frozenset(_BLOCKS)

_SHARED_VOCAB = ModelArchitecture(
    embeddings=("model.shared", "model.encoder.embed_tokens", "model.decoder.embed_tokens"),
    heads=("lm_head",),
    tied=True,
)
_MODELS.update(
    {
        "BertForMaskedLM": ModelArchitecture(
            ("bert.embeddings.word_embeddings",), ("cls.predictions.decoder",), tied=True
        ),
        "BertForSequenceClassification": ModelArchitecture(("bert.embeddings.word_embeddings",)),
        "RobertaForMaskedLM": ModelArchitecture(
            ("roberta.embeddings.word_embeddings",), ("lm_head.decoder",), tied=True
        ),
        "RobertaForSequenceClassification": ModelArchitecture(("roberta.embeddings.word_embeddings",)),
        "DistilBertForMaskedLM": ModelArchitecture(
            ("distilbert.embeddings.word_embeddings",), ("vocab_projector",), tied=True
        ),
        "DistilBertForSequenceClassification": ModelArchitecture(("distilbert.embeddings.word_embeddings",)),
        "MarianMTModel": _SHARED_VOCAB,
        "BartForConditionalGeneration": _SHARED_VOCAB,
    }
)
