"""Knowledge distillation: a frozen teacher's logits train the student (see :mod:`.callback`).

Split by job: :mod:`.objectives` (the loss formulas), :mod:`.teacher` (where the teacher comes from,
freezing, compatibility), :mod:`.cache` (teacher outputs computed once per distinct example),
:mod:`.sequence_level` (the teacher's translations as training targets), :mod:`.intermediate`
(TinyBERT-style transfer of hidden states and attention maps), :mod:`.callback`
(:class:`Distillation`).
"""

from lightning_efficient.callbacks.distillation.cache import TeacherOutputCache, example_keys
from lightning_efficient.callbacks.distillation.callback import Distillation
from lightning_efficient.callbacks.distillation.intermediate import LayerTransfer
from lightning_efficient.callbacks.distillation.objectives import distillation_losses, hard_targets, soft_losses
from lightning_efficient.callbacks.distillation.sequence_level import distil_targets, teacher_translations
from lightning_efficient.callbacks.distillation.teacher import load_teacher

__all__ = [
    "Distillation",
    "LayerTransfer",
    "TeacherOutputCache",
    "distil_targets",
    "distillation_losses",
    "example_keys",
    "hard_targets",
    "load_teacher",
    "soft_losses",
    "teacher_translations",
]
