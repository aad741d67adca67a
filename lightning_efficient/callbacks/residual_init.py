"""ResidualInit: initialisation schemes for deep Transformers (ReZero, SkipInit, LayerScale, T-Fixup, DeepNorm).

Each scheme rewrites the residual blocks of a model the architecture table knows
(:mod:`lightning_efficient.architectures`: BERT, ViT, Marian/BART encoder and decoder,
``nn.TransformerEncoderLayer``/``DecoderLayer``, a registered block). A block's *branches* are its
sublayers (each attention, then the FFN); a branch's output is the output of its last projection
(the attention's output projection, the FFN's second projection), which a
:class:`BranchScale` multiplies before dropout and the residual add. Three kinds of change, combined
per scheme:

| scheme | branch scale (initial value) | block norms | weights |
|---|---|---|---|
| ``rezero`` | learnable scalar per branch (0) | removed | kept |
| ``skipinit`` | learnable scalar per branch (``init_value``) | kept (removed with ``remove_norms``) | kept |
| ``layerscale`` | learnable vector per branch (``epsilon``) | kept | kept |
| ``t_fixup`` | none | removed | Xavier, then scaled |
| ``deepnorm`` | constant ``1 / alpha`` | eps / alpha^2 | Xavier normal, gain beta |

- **ReZero** (Bachlechner et al. 2020): ``x + a * F(x)``, ``a = 0`` at init, no LayerNorm, so every
  block is the identity at step 0. The reference code shares one ``a`` between a layer's sublayers;
  here each branch has its own (the issue's choice), which the paper's analysis allows.
- **SkipInit** (De & Smith 2020): the same scalar at the end of each branch, LayerNorm kept by default.
- **LayerScale** (Touvron et al. 2021, CaiT): a per-channel ``gamma`` on each branch, initialised to
  ``epsilon``; by default CaiT's by-depth values (:func:`layerscale_epsilon`).
- **T-Fixup** (Huang et al. 2020): block LayerNorms removed; every block projection Xavier-uniform
  (gain 1, bias 0); then the value and output projections of each attention and both FFN projections
  are multiplied by ``0.67 N^-1/4`` in encoder blocks and ``(9M)^-1/4`` in decoder blocks; the word
  embeddings are drawn from ``N(0, d^-1/2)`` and multiplied by ``(9M)^-1/4`` (encoder-decoder, as the
  paper) or ``(9N)^-1/4`` (encoder only, the reference code's encoder factor) (:func:`t_fixup_factors`).
  The reference code (layer6ai-labs/T-Fixup) multiplies the value projection by a further ``sqrt(2)``:
  that undoes fairseq's ``1/sqrt(2)`` Xavier gain on ``v_proj``. Here every projection is Xavier with
  gain 1, so the paper's factor without ``sqrt(2)`` gives the same weights as the reference code.
  BERT keeps its embedding LayerNorm (it is not in a block), which normalises the scaled embeddings
  again; ViT's patch embedding is a convolution and is left as it is.
- **DeepNorm** (Wang et al. 2022, DeepNet): ``x_{l+1} = LN(alpha * x + G(x))``, with ``q, k`` Xavier-normal
  (gain 1) and the value, output and FFN projections Xavier-normal with gain ``beta`` (the paper's
  pseudocode). Post-LN blocks only. It is built as ``LN'(x + G(x) / alpha)`` where ``LN'`` is the same
  LayerNorm with ``eps / alpha^2``: LayerNorm is scale-invariant, ``LN_eps(alpha * y) = LN_{eps/alpha^2}(y)``,
  so the two are the same function with the same gradients, and every post-LN block of the table gets it
  without a patched forward. The constants are the paper's table (:func:`deepnorm_constants`), as
  xformers' ``get_deepnorm_coefficients``: for an encoder-decoder's encoder ``beta = 0.87 (N^4 M)^-1/16``;
  microsoft/torchscale divides by ``(N^4 M)^1/16 / 1.15``, i.e. ``beta = 1.15 (N^4 M)^-1/16`` (1.32x
  larger). We follow the paper, whose derivation the number comes from.

Where the scheme removes a norm, the norm module is replaced by :class:`RemovedNorm` (the identity,
keeping ``eps`` for ``nn.TransformerEncoderLayer``'s checks). The change is applied in ``setup``,
before a checkpoint's weights load, so a resumed run restores the branch scales; it stays after fit
(the trained model needs it), and it is recorded in the checkpoint (:meth:`ResidualInit.surgery`),
so loading a checkpoint made with another scheme, or none, stops before its weights load.

With :class:`~lightning_efficient.callbacks.ProgressiveStacking`, a grown block keeps the weights it
copied and its branch scales start again at their initial values: growth is function-preserving for
``rezero`` (and ``skipinit`` with ``init_value=0``), where the new blocks start as the identity;
nearly so for ``layerscale`` (``epsilon``); not for ``t_fixup`` and ``deepnorm``, which keep no
per-block gate.

Examples:
    >>> import torch
    >>> from lightning_efficient import BertMLM
    >>> model = BertMLM(vocab_size=50, preset="tiny")
    >>> scheme = ResidualInit(scheme="rezero")
    >>> scheme.attach(model)
    >>> ids = torch.randint(0, 50, (2, 7))
    >>> bert = model.model.bert
    >>> embedded = bert.embeddings(ids)
    >>> torch.allclose(bert.encoder(embedded).last_hidden_state, embedded)  # every block is the identity
    True
    >>> round(deepnorm_constants(6, 6)["encoder"][0], 2), round(deepnorm_constants(6, 6)["encoder"][1], 2)
    (1.42, 0.5)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_efficient.architectures import BlockView, block_view, model_architecture_of
from lightning_efficient.blocks import BlockStack, find_block_stacks
from lightning_efficient.callbacks.quantization.attention import no_fast_path
from lightning_efficient.errors import ConfigurationError
from lightning_efficient.technique import Technique, check_choice, check_range

__all__ = [
    "LAYOUTS",
    "RESIDUAL_SCALES",
    "SCHEMES",
    "BranchScale",
    "RemovedNorm",
    "ResidualInit",
    "deepnorm_constants",
    "layerscale_epsilon",
    "t_fixup_factors",
]

SCHEMES = ("rezero", "skipinit", "layerscale", "t_fixup", "deepnorm")
"""The schemes :class:`ResidualInit` knows."""

LAYOUTS = ("auto", "encoder", "decoder", "encoder_decoder")
"""Which formula set of T-Fixup and DeepNorm applies: from the model's stacks (``auto``), or forced."""

RESIDUAL_SCALES = "residual_scales"
"""The attribute of a block holding its :class:`BranchScale` modules (one per branch, in branch order)."""


def layerscale_epsilon(depth: int) -> float:
    """CaiT's initial LayerScale value for a stack of ``depth`` blocks: 0.1 up to 18, 1e-5 up to 24, 1e-6 deeper.

    Examples:
        >>> [layerscale_epsilon(d) for d in (12, 24, 36)]
        [0.1, 1e-05, 1e-06]
    """
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


def t_fixup_factors(encoder_layers: int, decoder_layers: int = 0) -> dict[str, float]:
    """T-Fixup's factors (Huang et al. 2020) for ``N`` encoder and ``M`` decoder blocks.

    Returns:
        ``encoder``: ``0.67 N^-1/4``; ``decoder``: ``(9M)^-1/4``; ``embedding``: ``(9M)^-1/4`` with a
        decoder, else ``(9N)^-1/4``. Keys of an absent stack are left out (``embedding`` always there).

    Examples:
        >>> {k: round(v, 4) for k, v in t_fixup_factors(6, 6).items()}
        {'encoder': 0.4281, 'decoder': 0.3689, 'embedding': 0.3689}
    """
    factors = {}
    if encoder_layers:
        factors["encoder"] = 0.67 * encoder_layers**-0.25
    if decoder_layers:
        factors["decoder"] = (9 * decoder_layers) ** -0.25
    factors["embedding"] = (9 * (decoder_layers or encoder_layers)) ** -0.25
    return factors


def deepnorm_constants(encoder_layers: int, decoder_layers: int = 0) -> dict[str, tuple[float, float]]:
    """DeepNorm's ``(alpha, beta)`` per stack (Wang et al. 2022, the paper's table) for ``N`` and ``M`` blocks.

    Encoder only: ``((2N)^1/4, (8N)^-1/4)``; decoder only: the same with ``M``; encoder-decoder: encoder
    ``(0.81 (N^4 M)^1/16, 0.87 (N^4 M)^-1/16)``, decoder ``((3M)^1/4, (12M)^-1/4)``.

    Examples:
        >>> [round(x, 3) for x in deepnorm_constants(12)["encoder"]]
        [2.213, 0.319]
    """
    n, m = encoder_layers, decoder_layers
    if n and m:
        encoder = 0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)
        return {"encoder": encoder, "decoder": ((3 * m) ** 0.25, (12 * m) ** -0.25)}
    if m:
        return {"decoder": ((2 * m) ** 0.25, (8 * m) ** -0.25)}
    return {"encoder": ((2 * n) ** 0.25, (8 * n) ** -0.25)}


class BranchScale(nn.Module):
    """Multiplies a residual branch's output: ``x * scale``.

    Args:
        value: The initial value (also the value a grown copy restarts from, :meth:`reset_when_copied`).
        width: A per-channel vector of this size (LayerScale), or None for a scalar.
        learnable: A parameter (trained), or a buffer (DeepNorm's constant).

    Examples:
        >>> scale = BranchScale(0.5, width=3)
        >>> scale(torch.ones(2, 3)).tolist()
        [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]
    """

    def __init__(self, value: float, width: int | None = None, learnable: bool = True) -> None:
        super().__init__()
        self.value = float(value)
        tensor = torch.full((width,) if width else (), self.value)
        if learnable:
            self.scale = nn.Parameter(tensor)
        else:
            self.register_buffer("scale", tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    @torch.no_grad()
    def reset_when_copied(self) -> None:
        """Back to the initial value (ProgressiveStacking calls it on a block it grew by copying)."""
        self.scale.fill_(self.value)

    def extra_repr(self) -> str:
        return (
            f"value={self.value:g}, shape={tuple(self.scale.shape)}, learnable={isinstance(self.scale, nn.Parameter)}"
        )


class RemovedNorm(nn.Identity):
    """Where a scheme removed a LayerNorm: the identity. Keeps ``eps``, which ``nn.TransformerEncoderLayer`` reads."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps


def _branches(view: BlockView) -> list[tuple[nn.Module, int]]:
    """Each branch's last module (whose output the scale multiplies) and its width: attentions, then the FFN."""
    branches = []
    for attention in view.attentions:  # a fused nn.MultiheadAttention does not call its out_proj: scale its output
        branches.append((attention.module if attention.fused else attention.output, attention.output.out_features))
    if view.ffn is not None:
        branches.append((view.ffn.second, view.ffn.second.out_features))
    return branches


class _ScaleOutput:
    """A forward hook that multiplies a branch's output by its :class:`BranchScale` (a class: models pickle)."""

    def __init__(self, scale: BranchScale) -> None:
        self.scale = scale

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):  # nn.MultiheadAttention: (output, weights)
            return (self.scale(output[0]), *output[1:])
        return self.scale(output)


def _projections(view: BlockView) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The block's query/key weights, its value and output weights, and the biases of all of them."""
    query_key, value_output, biases = [], [], []
    for attention in view.attentions:
        if attention.fused:
            q, k, v = getattr(attention.module, attention.layout.in_proj).chunk(3)  # views of the fused weight
            query_key += [q, k]
            value_output.append(v)
            biases.append(getattr(attention.module, "in_proj_bias", None))
        else:
            query_key += [attention.projections[0].weight, attention.projections[1].weight]
            value_output.append(attention.projections[2].weight)
            biases += [linear.bias for linear in attention.projections]
        value_output.append(attention.output.weight)
        biases.append(attention.output.bias)
    if view.ffn is not None:
        value_output += [view.ffn.first.weight, view.ffn.second.weight]
        biases += [view.ffn.first.bias, view.ffn.second.bias]
    return query_key, value_output, [bias for bias in biases if bias is not None]


class _Surgery:
    """Undoes a :class:`ResidualInit` on one model: hooks removed, scales deleted, norms and eps put back."""

    def __init__(self) -> None:
        self.hooks: list[Any] = []
        self.blocks: list[nn.Module] = []
        self.norms: list[tuple[nn.Module, str, nn.Module]] = []
        self.eps: list[tuple[nn.Module, float]] = []

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for block in self.blocks:
            delattr(block, RESIDUAL_SCALES)
        for parent, name, norm in self.norms:
            setattr(parent, name, norm)
        for norm, eps in self.eps:
            norm.eps = eps


class ResidualInit(Technique):
    """Rewrite every residual block with an initialisation scheme for deep Transformers (see the module docstring).

    Args:
        scheme: ``"rezero"``, ``"skipinit"``, ``"layerscale"``, ``"t_fixup"`` or ``"deepnorm"``.
        init_value: SkipInit's initial branch scalar (default 0; De & Smith: 0, or below ``1/sqrt(blocks)``).
        remove_norms: SkipInit only: also remove the block norms (ReZero with SkipInit's init value).
        epsilon: LayerScale's initial per-channel value (> 0); None: CaiT's value for the deepest stack's
            depth (:func:`layerscale_epsilon`).
        layout: The formula set of ``t_fixup`` and ``deepnorm``: ``"auto"`` (from the model: a stack whose
            blocks have a cross-attention is a decoder), ``"encoder"``, ``"decoder"`` (one stack) or
            ``"encoder_decoder"`` (needs both stacks).
        block_paths: Attribute paths of the block lists, for models the block locator does not know.

    Train without warmup at the recipe's LR (``configs/techniques/residual_init_*.yaml`` say which). The
    branch scalars and vectors have fewer than two dimensions, so the package's optimizers give them no
    weight decay, and LAMB a trust ratio of 1 while they are 0.
    """

    name = "residual_init"
    distributed_safe = True
    keep_after_fit = True
    compile_safe = True  # tests/test_compile.py: compiled training equals eager
    compile_note = "its surgery is done at setup, before the model is compiled"

    def __init__(
        self,
        scheme: str = "rezero",
        init_value: float = 0.0,
        remove_norms: bool = False,
        epsilon: float | None = None,
        layout: str = "auto",
        block_paths: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.scheme = check_choice("scheme", scheme, SCHEMES)
        self.init_value = float(init_value)
        if remove_norms and scheme != "skipinit":
            raise ConfigurationError(f"remove_norms=True is SkipInit's option; scheme={scheme!r} decides its norms")
        self.remove_norms = bool(remove_norms) or scheme in ("rezero", "t_fixup")
        if epsilon is not None:
            epsilon = float(check_range("epsilon", epsilon, low=0.0, low_inclusive=False))
        self.epsilon = epsilon
        self.layout = check_choice("layout", layout, LAYOUTS)
        self.block_paths = list(block_paths) if block_paths else None

    # -- the surgery ------------------------------------------------------------------------------
    def _views(self, pl_module: nn.Module) -> list[tuple[str, BlockStack, list[BlockView]]]:
        """Each block stack with its role for the formulas (``encoder`` or ``decoder``) and its block views."""
        stacks = find_block_stacks(pl_module, self.block_paths)
        found = []
        for stack in stacks:
            views = [block_view(block) for block in stack.blocks]
            decoder = stack.role == "decoder" or any(a.layout.cross for v in views for a in v.attentions)
            found.append(("decoder" if decoder else "encoder", stack, views))
        return found

    def _depths(self, found: list[tuple[str, BlockStack, list[BlockView]]], pl_module: nn.Module) -> dict[str, int]:
        depths = {"encoder": 0, "decoder": 0}
        for role, stack, _ in found:
            depths[role] = max(depths[role], len(stack))
        if self.layout == "encoder_decoder" and not (depths["encoder"] and depths["decoder"]):
            shown = ", ".join(f"{stack.path} ({role})" for role, stack, _ in found)
            raise ConfigurationError(
                f"layout='encoder_decoder' needs an encoder and a decoder stack; {type(pl_module).__name__} has {shown}: "
                "use layout='auto'"
            )
        if self.layout in ("encoder", "decoder"):
            if len(found) != 1:
                raise ConfigurationError(
                    f"layout={self.layout!r} is for a model with one block stack; {type(pl_module).__name__} has "
                    f"{len(found)}: use layout='auto'"
                )
            depths = {"encoder": 0, "decoder": 0, self.layout: len(found[0][1])}
        return depths

    def apply(self, pl_module: nn.Module) -> list[Any]:
        found = self._views(pl_module)
        depths = self._depths(found, pl_module)
        role_of = (lambda role: self.layout) if self.layout in ("encoder", "decoder") else (lambda role: role)
        if self.scheme == "deepnorm":
            pre = [stack.path for _, stack, views in found if any(v.residual == "pre" for v in views)]
            if pre:
                raise ConfigurationError(
                    f"deepnorm rescales post-LN blocks (LN(alpha * x + G(x))); the blocks of {', '.join(pre)} are "
                    "pre-LN: use scheme='rezero', 'skipinit' or 'layerscale'"
                )
        surgery = _Surgery()
        constants = deepnorm_constants(depths["encoder"], depths["decoder"]) if self.scheme == "deepnorm" else {}
        factors = t_fixup_factors(depths["encoder"], depths["decoder"]) if self.scheme == "t_fixup" else {}
        epsilon = self.epsilon or layerscale_epsilon(max(depths.values()))
        for role, _, views in found:
            role = role_of(role)
            for view in views:
                if self.remove_norms:
                    self._remove_norms(view, surgery)
                scales = []
                for module, width in _branches(view):
                    scale = self._branch_scale(role, width, epsilon, constants)
                    if scale is not None:
                        scales.append(scale)
                        surgery.hooks.append(module.register_forward_hook(_ScaleOutput(scale)))
                if scales:
                    setattr(view.block, RESIDUAL_SCALES, nn.ModuleList(scales))
                    surgery.blocks.append(view.block)
                if self.scheme == "deepnorm":
                    self._deepnorm(view, constants[role], surgery)
                elif self.scheme == "t_fixup":
                    self._t_fixup(view, factors[role])
        if self.scheme == "t_fixup":
            self._t_fixup_embeddings(pl_module, factors["embedding"])
        return [surgery]

    def _branch_scale(
        self, role: str, width: int, epsilon: float, constants: dict[str, tuple[float, float]]
    ) -> BranchScale | None:
        if self.scheme == "rezero":
            return BranchScale(0.0)
        if self.scheme == "skipinit":
            return BranchScale(self.init_value)
        if self.scheme == "layerscale":
            return BranchScale(epsilon, width=width)
        if self.scheme == "deepnorm":
            return BranchScale(1.0 / constants[role][0], learnable=False)
        return None  # t_fixup: weights only

    @staticmethod
    def _remove_norms(view: BlockView, surgery: _Surgery) -> None:
        # a hook keeps nn.TransformerEncoderLayer off its fused inference path, which reads the norms' weights
        surgery.hooks.append(view.block.register_forward_pre_hook(no_fast_path))
        for path in view.architecture.norms:
            owner_path, _, name = path.rpartition(".")
            owner = view.block.get_submodule(owner_path)
            norm = getattr(owner, name)
            setattr(owner, name, RemovedNorm(getattr(norm, "eps", 1e-5)))
            surgery.norms.append((owner, name, norm))

    @staticmethod
    @torch.no_grad()
    def _deepnorm(view: BlockView, constants: tuple[float, float], surgery: _Surgery) -> None:
        alpha, beta = constants
        query_key, value_output, _ = _projections(view)
        for weight in query_key:
            nn.init.xavier_normal_(weight, gain=1.0)
        for weight in value_output:
            nn.init.xavier_normal_(weight, gain=beta)
        for norm in view.norms:  # LN(alpha x + G) = LN_{eps / alpha^2}(x + G / alpha)
            surgery.eps.append((norm, norm.eps))
            norm.eps = norm.eps / alpha**2

    @staticmethod
    @torch.no_grad()
    def _t_fixup(view: BlockView, factor: float) -> None:
        query_key, value_output, biases = _projections(view)
        for weight in query_key + value_output:
            nn.init.xavier_uniform_(weight, gain=1.0)
        for weight in value_output:
            weight.mul_(factor)
        for bias in biases:
            bias.zero_()

    @torch.no_grad()
    def _t_fixup_embeddings(self, pl_module: nn.Module, factor: float) -> None:
        for model in pl_module.modules():
            architecture = model_architecture_of(model)
            if architecture is None:
                continue
            done = set()
            for path in architecture.embeddings:
                table = model.get_submodule(path)
                if id(table.weight) in done:  # tied tables are one tensor: scaled once
                    continue
                done.add(id(table.weight))
                nn.init.normal_(table.weight, std=table.embedding_dim**-0.5)
                table.weight.mul_(factor)
                if table.padding_idx is not None:
                    table.weight[table.padding_idx].zero_()

    # -- checkpoints ------------------------------------------------------------------------------
    def surgery(self) -> dict[str, Any]:
        """The scheme and whether the norms are gone: what a checkpoint's weights need (see :meth:`Technique.surgery`)."""
        return {"technique": self.describe(), "scheme": self.scheme, "remove_norms": self.remove_norms}

    def describe(self) -> str:
        """The constructor call that rebuilds this structure, for messages (``ResidualInit(scheme='rezero')``)."""
        extra = ", remove_norms=True" if self.scheme == "skipinit" and self.remove_norms else ""
        return f"ResidualInit(scheme={self.scheme!r}{extra})"
