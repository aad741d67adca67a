"""Intermediate-layer transfer (TinyBERT-style): layer pairs, the two losses, and the hooks of LayerTransfer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_efficient import BertClassifier, BertMLM, ConfigurationError
from lightning_efficient.architectures import attention_views
from lightning_efficient.callbacks.distillation.intermediate import (
    LayerTransfer,
    attention_loss,
    attention_probabilities,
    hidden_state_loss,
    layer_pairs,
)
from lightning_efficient.callbacks.distillation.objectives import distillation_losses
from lightning_efficient.callbacks.distillation.teacher import freeze
from lightning_efficient.losses import SOFT_TARGETS_KEY, TRAINING_ONLY, SoftTargets, classification_loss
from lightning_efficient.models.base import decay_parameter_groups
from lightning_efficient.models.students import bert_student

VOCAB = 97  # odd sizes on purpose
TEACHER = {"preset": "tiny", "num_layers": 4, "hidden_size": 32, "num_heads": 4, "ffn_size": 37, "max_length": 40}
STUDENT = {"preset": "tiny", "num_layers": 2, "hidden_size": 24, "num_heads": 4, "ffn_size": 29, "max_length": 40}


def classifier(seed: int, **size: int | str) -> BertClassifier:
    torch.manual_seed(seed)
    return BertClassifier(vocab_size=VOCAB, num_labels=3, **size)


def eager(model: BertClassifier) -> BertClassifier:
    model.model.set_attn_implementation("eager")
    return model


def padded_batch(seed: int = 0, batch: int = 3, tokens: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask whose rows 1 and 2 end in padding (pad id 0)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, tokens), generator=generator)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def hook_count(*models: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models for m in model.modules())


# -- layer pairs -----------------------------------------------------------------------------------
def test_uniform_pairs_follow_tinybert() -> None:
    for teacher_layers, student_layers in ((4, 2), (12, 4), (12, 6), (6, 3)):
        k = teacher_layers // student_layers
        expected = [(i, i * k + k - 1) for i in range(student_layers)]  # TinyBERT: teacher_atts[i * k + k - 1]
        assert layer_pairs(student_layers, teacher_layers, "uniform") == expected
    assert layer_pairs(2, 4, "uniform") == [(0, 1), (1, 3)]
    assert layer_pairs(4, 12, "uniform") == [(0, 2), (1, 5), (2, 8), (3, 11)]
    assert layer_pairs(3, 3, "uniform") == [(0, 0), (1, 1), (2, 2)]


def test_explicit_pairs() -> None:
    assert layer_pairs(3, 12, [0, 6, 11]) == [(0, 0), (1, 6), (2, 11)]
    assert layer_pairs(2, 4, (3, 3)) == [(0, 3), (1, 3)]  # a teacher block may teach two student blocks


@pytest.mark.parametrize(
    ("layer_map", "message"),
    [
        ([0, 1, 2], r"layer map \[0, 1, 2\] has 3 entries but the student has 2 blocks"),
        ([0], r"layer map \[0\] has 1 entries"),
        ([0, 4], r"layer map \[0, 4\] holds \[4\]; the teacher's blocks are numbered 0 to 3"),
        ([-1, 2], r"holds \[-1\]"),
        ([0, 1.0], r"holds \[1.0\]"),
        ([True, 2], r"holds \[True\]"),
        ("every_other", r"layer map 'every_other' is not one of \['uniform'\]"),
        (7, r"layer map 7 must be 'uniform' or a list"),
    ],
)
def test_bad_layer_maps_are_named(layer_map: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        layer_pairs(2, 4, layer_map)  # type: ignore[arg-type]


def test_uniform_refuses_a_deeper_student() -> None:
    with pytest.raises(ConfigurationError, match="the student has 5 blocks and the teacher 4"):
        layer_pairs(5, 4, "uniform")
    assert layer_pairs(5, 4, [0, 0, 1, 2, 3])[-1] == (4, 3)  # a list can map it


# -- hidden states ---------------------------------------------------------------------------------
def test_hidden_state_loss_matches_a_written_out_mse_on_real_tokens() -> None:
    torch.manual_seed(0)
    _, mask = padded_batch()
    students = [torch.randn(3, 11, 5), torch.randn(3, 11, 5)]
    teachers = [torch.randn(3, 11, 7), torch.randn(3, 11, 7)]
    projection = nn.Linear(5, 7, bias=False)
    per_pair = []
    for student, teacher in zip(students, teachers):
        total, count = 0.0, 0
        for b in range(3):
            for t in range(11):
                if mask[b, t]:
                    projected = projection.weight.detach() @ student[b, t]
                    total += sum(float(projected[h] - teacher[b, t, h]) ** 2 for h in range(7))
                    count += 7
        per_pair.append(total / count)
    loss = hidden_state_loss(students, teachers, projection, mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-5)
    changed = [s.clone() for s in students]
    for s in changed:
        s[mask == 0] = 1e3  # padded positions do not count
    assert hidden_state_loss(changed, teachers, projection, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    same = [torch.randn(2, 4, 6)]
    assert hidden_state_loss(same, same).item() == 0.0
    without_mask = hidden_state_loss(students[:1], teachers[:1], projection)
    expected = (projection(students[0]) - teachers[0]).square().mean()
    assert without_mask.item() == pytest.approx(expected.item(), rel=1e-6)


def test_hidden_state_loss_refuses_what_does_not_fit() -> None:
    with pytest.raises(ConfigurationError, match="24 wide, the teacher's 32; give a projection"):
        hidden_state_loss([torch.zeros(2, 3, 24)], [torch.zeros(2, 3, 32)])
    with pytest.raises(ConfigurationError, match="same \\(batch, tokens\\)"):
        hidden_state_loss([torch.zeros(2, 3, 8)], [torch.zeros(2, 5, 8)])
    with pytest.raises(ConfigurationError, match="1 student and 2 teacher tensors"):
        hidden_state_loss([torch.zeros(2, 3, 8)], [torch.zeros(2, 3, 8)] * 2)
    with pytest.raises(ConfigurationError, match=r"attention_mask has shape \(2, 4\)"):
        hidden_state_loss([torch.zeros(2, 3, 8)], [torch.zeros(2, 3, 8)], attention_mask=torch.ones(2, 4))


# -- attention -------------------------------------------------------------------------------------
def captured_projections(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, int]], list]:
    """Hooks on each self-attention's query and key Linear (names and head counts from attention_views)."""
    captured: dict[str, torch.Tensor] = {}
    order, handles = [], []
    for path, view in attention_views(model).items():
        order.append((path, view.heads))
        for name, module in zip(("query", "key"), view.projections[:2]):
            handles.append(
                module.register_forward_hook(lambda m, a, out, key=f"{path}.{name}": captured.__setitem__(key, out))
            )
    return captured, order, handles


def test_attention_probabilities_equal_hf_eager_attentions() -> None:
    ids, mask = padded_batch(seed=1)
    for model in (eager(classifier(0, **TEACHER)).eval(), eager(classifier(1, **STUDENT)).eval()):
        captured, order, handles = captured_projections(model)
        with torch.no_grad():
            hf = model.model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        for handle in handles:
            handle.remove()
        assert len(order) == len(hf) == model.hparams.num_layers
        for (path, heads), expected in zip(order, hf):
            ours = attention_probabilities(captured[f"{path}.query"], captured[f"{path}.key"], heads, mask)
            assert ours.shape == expected.shape == (3, 4, 11, 11)
            torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=0)
            assert ours[2, :, :, 4:].abs().max().item() == 0.0  # padded keys get nothing


def test_attention_loss_matches_a_written_out_mse() -> None:
    torch.manual_seed(0)
    _, mask = padded_batch()
    students = [torch.rand(3, 4, 11, 11).softmax(-1) for _ in range(2)]
    teachers = [torch.rand(3, 4, 11, 11).softmax(-1) for _ in range(2)]
    per_pair = []
    for student, teacher in zip(students, teachers):
        total, count = 0.0, 0
        for b in range(3):
            for h in range(4):
                for q in range(11):
                    for k in range(11):
                        if mask[b, q] and mask[b, k]:
                            total += float(student[b, h, q, k] - teacher[b, h, q, k]) ** 2
                            count += 1
        per_pair.append(total / count)
    loss = attention_loss(students, teachers, mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-5)
    unmasked = attention_loss(students, teachers)
    assert unmasked.item() == pytest.approx(
        ((students[0] - teachers[0]).square().mean() + (students[1] - teachers[1]).square().mean()).item() / 2, rel=1e-5
    )
    with pytest.raises(ConfigurationError, match="the student has 3 heads, the teacher 4"):
        attention_loss([torch.zeros(1, 3, 5, 5)], [torch.zeros(1, 4, 5, 5)])


def test_layer_transfer_attention_term_equals_the_loss_of_hf_maps() -> None:
    """The whole path (hooks, Q/K reshaping, pairing) against HF's own eager attention maps."""
    teacher, student = eager(classifier(0, **TEACHER)).eval(), eager(classifier(1, **STUDENT)).eval()
    transfer = LayerTransfer(student, teacher, hidden_weight=0.0, attention_weight=1.0)
    transfer.attach()
    ids, mask = padded_batch(seed=2)
    transfer.begin(mask)
    with torch.no_grad():
        theirs = teacher.model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        ours = student.model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        loss = transfer.loss()
    expected = attention_loss([ours[0], ours[1]], [theirs[1], theirs[3]], mask)  # uniform 2 <- 4: (0, 1), (1, 3)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert loss.item() > 0
    transfer.remove()


# -- LayerTransfer ---------------------------------------------------------------------------------
def run_step(transfer: LayerTransfer, student: nn.Module, teacher: nn.Module, seed: int = 0) -> torch.Tensor:
    ids, mask = padded_batch(seed)
    transfer.begin(mask)
    with torch.no_grad():
        teacher(ids, mask)
    student(ids, mask)
    return transfer.loss()


def test_loss_is_zero_for_copies_of_the_mapped_teacher_layers() -> None:
    teacher = freeze(classifier(0, **TEACHER))
    same = copy.deepcopy(teacher)  # teacher = student: every pair identical, widths equal
    transfer = LayerTransfer(same, teacher, layer_map=[0, 1, 2, 3])
    transfer.attach()
    assert transfer.projection is None
    assert run_step(transfer, same, teacher).item() == 0.0
    assert set(transfer.last_terms) == {"hidden", "attention"}
    transfer.remove()
    one = bert_student(teacher, num_layers=1, layer_map=[0]).eval()  # teacher block 0 (and embeddings), copied
    transfer = LayerTransfer(one, teacher, layer_map=[0])
    transfer.attach()
    assert run_step(transfer, one, teacher).item() == 0.0
    transfer.remove()
    other = classifier(5, **{**TEACHER, "num_layers": 1}).eval()  # same shapes, other weights
    transfer = LayerTransfer(other, teacher, layer_map=[0])
    transfer.attach()
    loss = run_step(transfer, other, teacher)
    assert loss.item() > 0
    assert transfer.last_terms["hidden"].item() > 0 and transfer.last_terms["attention"].item() > 0
    total = (
        transfer.hidden_weight * transfer.last_terms["hidden"]
        + transfer.attention_weight * transfer.last_terms["attention"]
    )
    assert loss.item() == pytest.approx(total.item(), rel=1e-6)
    transfer.remove()


def test_weights_scale_the_terms() -> None:
    teacher, student = freeze(classifier(0, **TEACHER)), classifier(1, **STUDENT).eval()
    both = LayerTransfer(student, teacher, hidden_weight=2.0, attention_weight=3.0)
    both.attach()
    loss = run_step(both, student, teacher)
    terms = both.last_terms
    assert loss.item() == pytest.approx(2.0 * terms["hidden"].item() + 3.0 * terms["attention"].item(), rel=1e-6)
    both.remove()
    hidden_only = LayerTransfer(student, teacher, attention_weight=0.0)
    hidden_only.projection = both.projection  # the same projection: the same hidden term
    hidden_only.attach()
    assert run_step(hidden_only, student, teacher).item() == pytest.approx(terms["hidden"].item(), rel=1e-6)
    assert set(hidden_only.last_terms) == {"hidden"}
    hidden_only.remove()
    attention_only = LayerTransfer(student, teacher, hidden_weight=0.0)
    assert attention_only.projection is None  # no hidden term, nothing to project
    for bad in (
        {"hidden_weight": -1.0},
        {"attention_weight": float("nan")},
        {"hidden_weight": 0, "attention_weight": 0},
    ):
        with pytest.raises(ConfigurationError, match="weight"):
            LayerTransfer(student, teacher, **bad)


def test_gradients_reach_the_student_and_projection_not_the_teacher() -> None:
    teacher, student = freeze(classifier(0, **TEACHER)), classifier(1, **STUDENT)  # student in train mode
    transfer = LayerTransfer(student, teacher)
    assert transfer.pairs == [(0, 1), (1, 3)]
    assert isinstance(transfer.projection, nn.Linear) and transfer.projection.weight.shape == (32, 24)
    assert transfer.projection.bias is None
    transfer.attach()
    loss = run_step(transfer, student, teacher)
    assert loss.requires_grad
    loss.backward()
    assert transfer.projection.weight.grad is not None and transfer.projection.weight.grad.abs().sum() > 0
    for block in student.model.bert.encoder.layer:
        query = block.attention.self.query.weight.grad
        assert query is not None and query.abs().sum() > 0  # the attention term reaches the queries
        assert block.output.dense.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    transfer.remove()


def test_remove_leaves_no_hooks_and_captures_stop() -> None:
    teacher, student = freeze(classifier(0, **TEACHER)), classifier(1, **STUDENT).eval()
    before = hook_count(student, teacher)
    transfer = LayerTransfer(student, teacher)
    transfer.attach()
    transfer.attach()  # idempotent
    assert transfer.attached
    assert hook_count(student, teacher) == before + 2 * 2 * 3  # 2 pairs x 2 sides x (block, query, key)
    transfer.remove()
    assert not transfer.attached
    assert hook_count(student, teacher) == before
    ids, mask = padded_batch()
    transfer.begin(mask)
    student(ids, mask)
    with pytest.raises(ConfigurationError, match=r"nothing captured from student blocks \[0, 1\]"):
        transfer.loss()


def test_captures_only_between_begin_and_loss() -> None:
    teacher, student = freeze(classifier(0, **TEACHER)), classifier(1, **STUDENT).eval()
    transfer = LayerTransfer(student, teacher)
    transfer.attach()
    ids, mask = padded_batch()
    with torch.no_grad():
        teacher(ids, mask)  # not armed: a validation or cached step leaves nothing
    student(ids, mask)
    with pytest.raises(ConfigurationError, match=r"without begin\(\)"):
        transfer.loss()
    transfer.begin(mask)
    student(ids, mask)
    with pytest.raises(ConfigurationError, match=r"teacher blocks \[1, 3\] since begin\(\).*cache"):
        transfer.loss()
    assert run_step(transfer, student, teacher).item() > 0
    with pytest.raises(ConfigurationError, match="without begin"):
        transfer.loss()  # loss() cleared and disarmed
    transfer.remove()


def test_head_count_mismatch_is_refused_naming_both() -> None:
    teacher = freeze(classifier(0, **TEACHER))
    student = classifier(1, **{**STUDENT, "num_heads": 3})
    with pytest.raises(ConfigurationError, match="student block 0 has 3 heads and teacher block 1 has 4"):
        LayerTransfer(student, teacher)
    transfer = LayerTransfer(student, teacher, attention_weight=0.0)  # hidden states only: fine
    transfer.attach()
    assert run_step(transfer, student.eval(), teacher).item() > 0
    transfer.remove()


def test_models_without_a_supported_stack_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="found no Transformer block stack"):
        LayerTransfer(nn.Linear(3, 3), classifier(0, **TEACHER))
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=6)  # sequence-first
    with pytest.raises(ConfigurationError, match="sequence-first"):
        LayerTransfer(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), classifier(0, **TEACHER))
    first = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=6, batch_first=True)
    encoder = nn.TransformerEncoder(first, 2, enable_nested_tensor=False)
    with pytest.raises(ConfigurationError, match="fused Q/K/V in-projection"):
        LayerTransfer(encoder, classifier(0, **TEACHER))
    assert LayerTransfer(encoder, classifier(0, **TEACHER), attention_weight=0.0).projection is None


# -- with the loss protocol (what Distillation will wire) --------------------------------------------
def test_extra_term_is_added_after_the_students_forward() -> None:
    teacher, student = freeze(classifier(0, **TEACHER)), classifier(1, **STUDENT).eval()
    transfer = LayerTransfer(student, teacher)
    student.add_module(TRAINING_ONLY, nn.ModuleDict({"layer_projection": transfer.projection}))
    transfer.attach()
    ids, mask = padded_batch()
    labels = torch.tensor([0, 1, 2])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    transfer.begin(batch["attention_mask"])
    with torch.no_grad():
        teacher_logits = teacher.distillation_logits(batch)

    def rows(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return distillation_losses(s, t, y, "mse", 1.0, 0.0, "teacher")

    batch[SOFT_TARGETS_KEY] = SoftTargets(teacher_logits, rows, extra=transfer.loss)
    logits = student(ids, mask)
    loss = classification_loss(logits, labels, batch)
    soft = rows(logits, teacher_logits, labels).mean()
    terms = transfer.last_terms
    extra = transfer.hidden_weight * terms["hidden"] + transfer.attention_weight * terms["attention"]
    assert loss.item() == pytest.approx(soft.item() + extra.item(), rel=1e-5)
    assert not transfer._captures  # cleared by loss()
    # Attached under TRAINING_ONLY: trained by the student's optimizer, saved with it, dropped by a plain student.
    trained = {id(p) for group in decay_parameter_groups(student, 0.01) for p in group["params"]}
    assert id(transfer.projection.weight) in trained
    state = student.state_dict()
    assert f"{TRAINING_ONLY}.layer_projection.weight" in state
    plain = classifier(2, **STUDENT)
    plain.load_state_dict(state)
    assert not hasattr(plain, TRAINING_ONLY)
    for name, weight in plain.model.state_dict().items():
        torch.testing.assert_close(weight, student.model.state_dict()[name])
    transfer.remove()


def test_masked_lm_teacher_and_student_see_the_same_masked_ids() -> None:
    torch.manual_seed(0)
    teacher = freeze(BertMLM(vocab_size=VOCAB, **TEACHER))
    student = bert_student(teacher, num_layers=2, layer_map=[0, 1]).eval()  # copies of teacher blocks 0 and 1
    transfer = LayerTransfer(student, teacher, layer_map=[0, 1])
    transfer.attach()
    ids, mask = padded_batch()
    batch = {"input_ids": ids, "attention_mask": mask}
    transfer.begin(batch["attention_mask"])
    with torch.no_grad():
        teacher.distillation_logits(batch)  # draws the masks into the batch
    student.distillation_logits(batch)  # predicts with the same masked ids
    assert "mlm_input_ids" in batch
    assert transfer.loss().item() == 0.0
    transfer.remove()


def test_composes_with_activation_checkpointing_and_autocast() -> None:
    """Checkpointed student blocks give the same loss and gradients; recomputation in backward captures nothing."""
    from lightning_efficient.callbacks.activation_checkpointing import ActivationCheckpointing

    teacher = freeze(classifier(0, **TEACHER))
    results = []
    for checkpointed in (False, True):
        student = classifier(1, **STUDENT).eval()
        transfer = LayerTransfer(student, teacher)
        torch.manual_seed(2)
        transfer.projection = nn.Linear(24, 32, bias=False)
        if checkpointed:
            ActivationCheckpointing().attach(student)
        transfer.attach()
        loss = run_step(transfer, student, teacher)
        loss.backward()
        assert not transfer._captures  # nothing captured while blocks were recomputed
        grads = torch.cat([p.grad.flatten() for p in student.model.bert.encoder.parameters()])
        results.append((loss.item(), grads))
        transfer.remove()
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)
    student = classifier(1, **STUDENT).eval()
    transfer = LayerTransfer(student, teacher)
    transfer.attach()
    plain = run_step(transfer, student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run_step(transfer, student, teacher)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(plain.item(), rel=5e-2)
    transfer.remove()


@pytest.mark.parametrize("family", ["distilbert", "marian"])
def test_other_families_match_their_eager_attentions(family: str) -> None:
    """DistilBERT (its own attention names) and Marian (the encoder stack of an encoder-decoder)."""
    from transformers import DistilBertConfig, DistilBertModel, MarianConfig, MarianMTModel

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if family == "distilbert":
            config = DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=21,
                                      max_position_embeddings=40, attn_implementation="eager")  # fmt: skip
            return DistilBertModel(config).eval()
        config = MarianConfig(vocab_size=VOCAB, d_model=16, encoder_layers=2, decoder_layers=1,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=21,
                              decoder_ffn_dim=21, max_position_embeddings=40, pad_token_id=0,
                              decoder_start_token_id=0, attn_implementation="eager")  # fmt: skip
        return MarianMTModel(config).eval()

    teacher, student = build(0), build(1)
    transfer = LayerTransfer(student, teacher, hidden_weight=0.0)
    transfer.attach()
    ids, mask = padded_batch()
    extra = {} if family == "distilbert" else {"decoder_input_ids": ids[:, :4]}
    transfer.begin(mask)
    with torch.no_grad():
        theirs = teacher(input_ids=ids, attention_mask=mask, output_attentions=True, **extra)
        ours = student(input_ids=ids, attention_mask=mask, output_attentions=True, **extra)
    name = "attentions" if family == "distilbert" else "encoder_attentions"
    expected = attention_loss(list(getattr(ours, name)), list(getattr(theirs, name)), mask)
    assert transfer.loss().item() == pytest.approx(expected.item(), rel=1e-4)
    assert transfer.student_stack.role == "encoder"
    transfer.remove()
