"""What our exports record in a saved model directory, and how such a directory loads back.

:func:`~lightning_efficient.callbacks.export_pruned` writes the per-layer shapes of a pruned HF
model into its config (``pruned_linears``: Linear path -> ``(out_features, in_features)``;
``pruned_heads_count``: attention path -> ``(attribute, heads)``), which plain
``from_pretrained`` cannot express; :func:`apply_recorded_shapes` gives a freshly built model those
shapes and :func:`load_pruned` loads such a directory. ``save_quantized`` marks an int8 directory
with :data:`QUANTIZATION_FILE`. Techniques write these records and models read them (starting
from pretrained weights), so they live here, on the floor under both.

Examples:
    >>> from transformers import BertConfig, BertModel
    >>> config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...                     intermediate_size=12, pruned_linears={"encoder.layer.0.intermediate.dense": [5, 8],
    ...                     "encoder.layer.0.output.dense": [8, 5]})
    >>> model = BertModel(config)
    >>> apply_recorded_shapes(model, config)
    >>> model.encoder.layer[0].intermediate.dense.weight.shape
    torch.Size([5, 8])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_efficient.architectures import attention_views
from lightning_efficient.errors import ConfigurationError

__all__ = ["QUANTIZATION_FILE", "apply_recorded_shapes", "load_pruned"]

#: The file ``save_quantized`` writes beside the int8 weights (its scheme); it marks an int8 directory.
QUANTIZATION_FILE = "quantization.json"


def apply_recorded_shapes(model: nn.Module, config: Any) -> None:
    """Give ``model`` the Linear shapes and head counts that ``export_pruned`` recorded in ``config``.

    The new weights are empty (load weights afterwards). The width attribute beside a head count,
    like BERT's ``all_head_size``, follows from the block's architecture entry.
    """
    for name, (out_features, in_features) in (getattr(config, "pruned_linears", None) or {}).items():
        linear = model.get_submodule(name)
        linear.weight = nn.Parameter(linear.weight.new_empty(out_features, in_features))
        linear.out_features, linear.in_features = out_features, in_features
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.new_empty(out_features))
    attentions = attention_views(model)
    for name, (attribute, count) in (getattr(config, "pruned_heads_count", None) or {}).items():
        setattr(model.get_submodule(name), attribute, count)
        attention = attentions.get(name)
        if attention is not None and attention.layout.width_attribute is not None:
            setattr(attention.module, attention.layout.width_attribute, count * attention.head_size)


def load_pruned(path: str | Path, model_class: type | None = None) -> nn.Module:
    """Load an HF model that was ``export_pruned`` ed and saved with ``save_pretrained``, whatever its shapes.

    Builds the model from its config, applies the recorded shapes (:func:`apply_recorded_shapes`),
    then loads the saved weights. A model without such records loads with plain ``from_pretrained``.

    Args:
        path: The directory ``save_pretrained`` wrote.
        model_class: The transformers class (default: the config's ``architectures[0]``).

    Raises:
        ConfigurationError: The saved weights do not fit the recorded shapes.
    """
    import transformers
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(path)
    cls = model_class or getattr(transformers, config.architectures[0])
    if not getattr(config, "pruned_linears", None):
        return cls.from_pretrained(path)
    model = cls(config)
    apply_recorded_shapes(model, config)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tensors = model.state_dict()
    loaded = {tensor.data_ptr() for key, tensor in tensors.items() if key in state}
    untied = [key for key in missing if tensors[key].data_ptr() not in loaded]  # tied weights are not saved
    if untied or unexpected:
        raise ConfigurationError(
            f"{path}: the saved weights do not fit the recorded shapes: missing {untied[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.eval()
