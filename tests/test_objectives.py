"""ST-AR losses against plain loop references, and the properties the method relies on."""

import math

import pytest
import torch
import torch.nn.functional as F

from st_ar.models.gpt import GPT, GPTConfig
from st_ar.objectives.ar import ar_loss
from st_ar.objectives.contrastive import sample_steps, step_infonce, view_infonce
from st_ar.objectives.masks import key_masked_causal_mask, sample_hidden_keys
from st_ar.objectives.mim import mim_loss
from st_ar.objectives.total import ObjectiveConfig, STARObjective
from st_ar.teacher import build_teacher, ema_schedule, update_ema


def tiny_gpt(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    args = dict(vocab_size=32, block_size=16, num_classes=5, token_dropout_p=0.0, resid_dropout_p=0.0)
    model = GPT(GPTConfig.from_name("GPT-debug", **{**args, "ffn_dropout_p": 0.0, **kw}))
    torch.nn.init.normal_(model.output.weight, std=0.05)
    return model


# ----------------------------------------------------------------------------- masks


def test_mask_hides_exact_ratio_never_the_class_slot():
    gen = torch.Generator().manual_seed(0)
    for ratio, T in [(0.25, 256), (0.15, 64), (0.45, 16), (0.0, 16)]:
        hidden = sample_hidden_keys(32, T, ratio, generator=gen)
        assert (hidden.sum(1) == round(ratio * T)).all()
        assert not hidden[:, 0].any()
    # rows differ: one mask per sequence
    hidden = sample_hidden_keys(8, 64, 0.25, generator=gen)
    assert len({tuple(row.tolist()) for row in hidden}) == 8
    with pytest.raises(ValueError, match="mask ratio"):
        sample_hidden_keys(2, 16, 1.0)


def test_key_mask_is_causal_and_every_query_keeps_itself():
    hidden = sample_hidden_keys(4, 16, 0.25, generator=torch.Generator().manual_seed(1))
    allowed = key_masked_causal_mask(hidden)  # (B, 1, S, S)
    assert allowed.shape == (4, 1, 16, 16)
    assert not torch.triu(allowed[:, 0], diagonal=1).any()  # causal
    assert torch.diagonal(allowed[:, 0], dim1=1, dim2=2).all()  # each query keeps itself
    for b in range(4):
        for q in range(16):
            for k in range(q):
                assert allowed[b, 0, q, k] == (not hidden[b, k])


def naive_forward(model: GPT, tokens, cond, allowed):
    """Reference GPT forward: explicit per-head loops and the mask applied in every layer."""
    c = model.config
    x = torch.cat([model.cls_embedding(cond)[:, None], model.tok_embeddings(tokens)], 1)
    S, H, hd = x.shape[1], c.n_head, c.head_dim
    rope = model.freqs_cis[:S]

    def rot(v):  # (S, hd) adjacent pairs
        out = torch.empty_like(v)
        cos, sin = rope[:, :, 0], rope[:, :, 1]
        out[:, 0::2] = v[:, 0::2] * cos - v[:, 1::2] * sin
        out[:, 1::2] = v[:, 1::2] * cos + v[:, 0::2] * sin
        return out

    def rms(v, w):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + c.norm_eps) * w

    outs = []
    for b in range(x.shape[0]):
        h = x[b]
        for layer in model.layers:
            a = rms(h, layer.attention_norm.weight)
            q, k, v = (a @ layer.attention.wqkv.weight.T).split(c.dim, -1)
            heads = []
            for i in range(H):
                sl = slice(i * hd, (i + 1) * hd)
                scores = rot(q[:, sl]) @ rot(k[:, sl]).T / math.sqrt(hd)
                scores = scores.masked_fill(~allowed[b, 0], float("-inf"))
                heads.append(scores.softmax(-1) @ v[:, sl])
            h = h + torch.cat(heads, -1) @ layer.attention.wo.weight.T
            f = rms(h, layer.ffn_norm.weight)
            ff = layer.feed_forward
            h = h + (F.silu(f @ ff.w1.weight.T) * (f @ ff.w3.weight.T)) @ ff.w2.weight.T
        outs.append(rms(h, model.norm.weight) @ model.output.weight.T)
    return torch.stack(outs)


def test_masked_forward_matches_naive_reference_in_every_layer():
    model = tiny_gpt().eval()
    tokens, cond = torch.randint(0, 32, (3, 15)), torch.tensor([0, 4, 5])
    hidden = sample_hidden_keys(3, 16, 0.25, generator=torch.Generator().manual_seed(2))
    allowed = key_masked_causal_mask(hidden)
    with torch.no_grad():
        ours = model(tokens, cond, attn_mask=allowed).logits
        ref = naive_forward(model, tokens, cond, allowed)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- losses


def test_ar_and_mim_losses_against_loops():
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    ref = sum(-logits[n, p].log_softmax(-1)[targets[n, p]] for n in range(2) for p in range(5)) / 10
    assert ar_loss(logits, targets).item() == pytest.approx(ref.item(), rel=1e-5)
    h, g = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    ref = sum(1 - (h[n, p] @ g[n, p]) / (h[n, p].norm() * g[n, p].norm()) for n in range(2) for p in range(5)) / 10
    assert mim_loss(h, g).item() == pytest.approx(ref.item(), rel=1e-5)
    assert mim_loss(h, h).abs().item() < 1e-6


def nce(anchor, positive, candidates, tau):
    return -(anchor @ positive / tau - torch.logsumexp(candidates @ anchor / tau, 0))


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


@pytest.mark.parametrize("offset,extra", [(0, 0), (2, 3)])
def test_step_infonce_against_loops(offset, extra):
    B, M, K, D, tau = 3, 2, 4, 8, 0.2
    z = unit(B, M, K, D)
    t_all = unit(B + extra, M, K, D)  # other ranks' targets around this rank's rows
    t_all[offset : offset + B] = unit(B, M, K, D)
    terms = [
        nce(z[b, m, i], t_all[offset + b, m, j], t_all[:, m, j], tau)
        for b in range(B)
        for m in range(M)
        for i in range(K)
        for j in range(K)
        if i != j
    ]
    ref = torch.stack(terms).mean()
    assert step_infonce(z, t_all, tau, offset).item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("offset,extra", [(0, 0), (1, 2)])
def test_view_infonce_against_loops(offset, extra):
    B, M, K, D, tau = 3, 3, 2, 8, 0.5
    z, t_all = unit(B, M, K, D), unit(B + extra, M, K, D)
    terms = [
        nce(z[b, m, k], t_all[offset + b, p, k], t_all[:, p, k], tau)
        for b in range(B)
        for k in range(K)
        for m in range(M)
        for p in range(M)
        if m != p
    ]
    ref = torch.stack(terms).mean()
    assert view_infonce(z, t_all, tau, offset).item() == pytest.approx(ref.item(), rel=1e-5)


def test_infonce_is_low_when_positives_align():
    t = unit(6, 1, 4, 16).expand(6, 2, 4, 16)  # both views give the same targets
    assert view_infonce(t, t, 0.05).item() < 0.05
    assert view_infonce(unit(6, 2, 4, 16), t, 0.05).item() > 1.0  # unrelated anchors: chance is log 6


def test_sample_steps_distinct_and_skip_class_slot():
    for seed in range(20):
        pos = sample_steps(16, 4, generator=torch.Generator().manual_seed(seed))
        assert len(set(pos.tolist())) == 4 and pos.min() >= 1 and pos.max() < 16
    with pytest.raises(ValueError):
        sample_steps(4, 4)


# ----------------------------------------------------------------------------- teacher


def test_ema_rule_and_schedules():
    student, teacher = tiny_gpt(0), build_teacher(tiny_gpt(1))
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    update_ema(teacher, student, 0.9)
    for name, s in student.named_parameters():
        torch.testing.assert_close(dict(teacher.named_parameters())[name], 0.9 * before[name] + 0.1 * s)
    update_ema(teacher, student, 0.0)  # decay 0 copies
    for name, s in student.named_parameters():
        assert torch.equal(dict(teacher.named_parameters())[name], s)
    frozen = {k: v.clone() for k, v in teacher.named_parameters()}
    update_ema(teacher, tiny_gpt(2), 1.0)  # decay 1 freezes
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.named_parameters())
    assert ema_schedule("constant", 0.9999, 100)(5) == 0.9999
    cos = ema_schedule("cosine", 0.999, 100, start=0.9)
    assert cos(0) == pytest.approx(0.9) and cos(100) == pytest.approx(0.999) and cos(50) == pytest.approx(0.9495)
    warm = ema_schedule("warmup", 0.999, 100)
    assert warm(0) == pytest.approx(0.1) and warm(10**6) == 0.999


def make_batch(B=4, M=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32, (B, M, T), generator=g), torch.randint(0, 5, (B,), generator=g)


def test_objective_total_and_teacher_gets_no_gradient():
    student = tiny_gpt(0).train()
    teacher = build_teacher(student)
    cfg = ObjectiveConfig(num_steps=4, projector_hidden=64, label_dropout=0.0)
    objective = STARObjective(cfg, dim=128, n_layer=2)
    tokens, labels = make_batch()
    total, losses = objective(
        student, teacher, tokens, labels, null_class=5, generator=torch.Generator().manual_seed(0)
    )
    assert set(losses) == {"ar", "mim", "step", "view"}
    expected = losses["ar"] + 1.0 * losses["mim"] + 0.5 * (losses["step"] + losses["view"]) / 2
    torch.testing.assert_close(total, expected)
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in objective.projector.parameters())
    assert student.layers[0].attention.wqkv.weight.grad.abs().sum() > 0
    # the teacher starts equal to the student, so MIM compares masked vs unmasked views only
    assert 0 < losses["mim"].item() < 1


def test_baseline_runs_without_teacher_or_projector():
    cfg = ObjectiveConfig(mim=False, step=False, view=False, num_views=1, label_dropout=0.0)
    objective = STARObjective(cfg, dim=128, n_layer=2)
    assert objective.projector is None and not cfg.needs_teacher
    student = tiny_gpt(0)
    tokens, labels = make_batch(M=1)
    total, losses = objective(student, None, tokens, labels, null_class=5)
    assert set(losses) == {"ar"}
    ref = ar_loss(student(tokens[:, 0, :-1], labels).logits, tokens[:, 0])
    torch.testing.assert_close(total, ref)


class Spy(torch.nn.Module):
    """Wraps a model and records the labels it was called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, tokens, labels, **kw):
        self.seen.append(labels.clone())
        return self.model(tokens, labels, **kw)


def test_label_dropout_is_shared_by_the_views_of_an_image_and_teacher():
    student, teacher = Spy(tiny_gpt(0)), Spy(build_teacher(tiny_gpt(0)))
    cfg = ObjectiveConfig(label_dropout=0.5, projector_hidden=32)
    objective = STARObjective(cfg, dim=128, n_layer=2)
    tokens, labels = make_batch(B=64, T=16)
    objective(student, teacher, tokens, labels, null_class=5, generator=torch.Generator().manual_seed(3))
    seen = student.seen[0].view(64, 2)
    assert torch.equal(seen[:, 0], seen[:, 1])  # both views of an image
    assert torch.equal(student.seen[0], teacher.seen[0])  # teacher sees the same labels
    dropped = (seen[:, 0] == 5).float().mean().item()
    assert 0.3 < dropped < 0.7


@pytest.mark.parametrize(
    "switches,keys",
    [
        (dict(step=False, view=False), {"ar", "mim"}),
        (dict(view=False), {"ar", "mim", "step"}),
        (dict(step=False), {"ar", "mim", "view"}),
        (dict(mim=False), {"ar", "step", "view"}),
    ],
)
def test_each_loss_switches_alone(switches, keys):
    cfg = ObjectiveConfig(projector_hidden=32, **switches)
    objective = STARObjective(cfg, dim=128, n_layer=2)
    student = tiny_gpt(0)
    tokens, labels = make_batch()
    _, losses = objective(student, build_teacher(student), tokens, labels, null_class=5)
    assert set(losses) == keys
    assert (objective.projector is None) == (not (cfg.step or cfg.view))


def test_config_validation():
    with pytest.raises(ValueError, match="num_views >= 2"):
        ObjectiveConfig(num_views=1)
    with pytest.raises(ValueError, match="contrastive_layer"):
        STARObjective(ObjectiveConfig(contrastive_layer=3), dim=128, n_layer=2)
    assert ObjectiveConfig().layer(12) == 6 and ObjectiveConfig().layer(24) == 12


# ----------------------------------------------------------------------------- the variants the paper leaves open


def run_objective(cfg, student, teacher, tokens, labels, seed=0):
    """The objective (its projector seeded) and its (total, losses), its draws from ``seed``."""
    torch.manual_seed(seed)  # the projector's initial weights
    objective = STARObjective(cfg, dim=128, n_layer=2)
    gen = torch.Generator().manual_seed(seed)
    return objective, objective(student, teacher, tokens, labels, null_class=5, generator=gen)


def test_student_on_one_view_against_a_reference():
    student = Spy(tiny_gpt(0).eval())  # eval: no dropout, so the reference forwards match
    teacher = Spy(build_teacher(tiny_gpt(1)))
    cfg = ObjectiveConfig(student_views=1, projector_hidden=32, label_dropout=0.0, mask_ratio=0.25)
    tokens, labels = make_batch(B=4, M=2, T=16)
    objective, (total, losses) = run_objective(cfg, student, teacher, tokens, labels)
    # the student ran view 0 of each image, the teacher both views
    assert student.seen[0].shape == (4,) and torch.equal(student.seen[0], labels)
    assert teacher.seen[0].shape == (8,) and torch.equal(teacher.seen[0], labels.repeat_interleave(2))
    # the same draws as the objective: the mask of the 4 student sequences, then the K steps
    gen = torch.Generator().manual_seed(0)
    hidden = sample_hidden_keys(4, 16, 0.25, generator=gen)
    pos = sample_steps(16, 4, generator=gen)
    s = student.model(tokens[:, 0, :-1], labels, attn_mask=key_masked_causal_mask(hidden), return_hidden=(1, 2))
    t = teacher.model(tokens.flatten(0, 1)[:, :-1], labels.repeat_interleave(2), return_hidden=(1, 2), logits=False)
    t_last = t.hidden[2].view(4, 2, 16, -1)[:, 0]
    torch.testing.assert_close(losses["ar"], ar_loss(s.logits, tokens[:, 0]))
    torch.testing.assert_close(losses["mim"], mim_loss(s.hidden[2], t_last))
    z = F.normalize(objective.projector(s.hidden[1][:, pos]), dim=-1)  # (4, K, D)
    tt = F.normalize(t.hidden[1][:, pos], dim=-1).view(4, 2, 4, -1)
    step_terms = [
        nce(z[b, i], tt[b, 0, j], tt[:, 0, j], 0.2) for b in range(4) for i in range(4) for j in range(4) if i != j
    ]
    view_terms = [nce(z[b, k], tt[b, 1, k], tt[:, 1, k], 0.2) for b in range(4) for k in range(4)]
    torch.testing.assert_close(losses["step"], torch.stack(step_terms).mean(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses["view"], torch.stack(view_terms).mean(), rtol=1e-4, atol=1e-5)
    expected = losses["ar"] + losses["mim"] + 0.5 * (losses["step"] + losses["view"]) / 2
    torch.testing.assert_close(total, expected)


def test_view_infonce_with_fewer_anchor_views_is_the_pairs_of_those_views():
    z, t = unit(3, 3, 2, 8), unit(3, 3, 2, 8)
    full_terms = view_infonce(z, t, 0.2)  # all ordered pairs of 3 views
    first = view_infonce(z[:, :1], t, 0.2)  # anchors of view 0: pairs (0, 1), (0, 2)
    ref = torch.stack(
        [nce(z[b, 0, k], t[b, p, k], t[:, p, k], 0.2) for b in range(3) for k in range(2) for p in (1, 2)]
    ).mean()
    assert first.item() == pytest.approx(ref.item(), rel=1e-5) and first.item() != pytest.approx(full_terms.item())


@pytest.mark.parametrize("ar_loss_on", ["all", "unmasked"])
def test_masked_share_masks_that_share_and_takes_mim_on_those_only(ar_loss_on):
    student, teacher = tiny_gpt(0).eval(), build_teacher(tiny_gpt(1))
    cfg = ObjectiveConfig(mim=True, step=False, view=False, masked_share=0.5, ar_loss_on=ar_loss_on, label_dropout=0.0)
    tokens, labels = make_batch(B=4, M=2, T=16)
    spy = Spy(teacher)
    _, (total, losses) = run_objective(cfg, student, spy, tokens, labels)
    # the same draws: which 4 of the 8 sequences are masked, then their masks
    gen = torch.Generator().manual_seed(0)
    rows = torch.randperm(8, generator=gen)[:4].sort().values
    hidden = torch.zeros(8, 16, dtype=torch.bool)
    hidden[rows] = sample_hidden_keys(4, 16, 0.25, generator=gen)
    assert (hidden.sum(1) > 0).sum() == 4 and hidden.sum() == 4 * 4
    seqs, lab = tokens.flatten(0, 1), labels.repeat_interleave(2)
    s = student(seqs[:, :-1], lab, attn_mask=key_masked_causal_mask(hidden), return_hidden=(2,))
    t = teacher(seqs[rows, :-1], lab[rows], return_hidden=(2,), logits=False)
    assert spy.seen[0].shape == (4,)  # L_MIM alone: the teacher runs the masked sequences only
    torch.testing.assert_close(losses["mim"], mim_loss(s.hidden[2][rows], t.hidden[2]))
    keep = torch.ones(8, dtype=torch.bool).index_fill_(0, rows, False)
    ar_rows = keep if ar_loss_on == "unmasked" else torch.ones(8, dtype=torch.bool)
    torch.testing.assert_close(losses["ar"], ar_loss(s.logits[ar_rows], seqs[ar_rows]))
    # the unmasked sequences' logits are those of a plain causal forward
    plain = student(seqs[keep, :-1], lab[keep]).logits
    torch.testing.assert_close(s.logits[keep], plain, atol=1e-5, rtol=1e-5)


def test_default_objective_is_unchanged_by_the_new_settings():
    # every variant at its default draws the same numbers and gives the same losses as the paper's step
    student, teacher = tiny_gpt(0).eval(), build_teacher(tiny_gpt(1))
    tokens, labels = make_batch()
    base = ObjectiveConfig(projector_hidden=32)
    spelled = ObjectiveConfig(projector_hidden=32, student_views=2, masked_share=1.0, ar_loss_on="all", ssl_until=1.0)
    _, (a, la) = run_objective(base, student, teacher, tokens, labels)
    _, (b, lb) = run_objective(spelled, student, teacher, tokens, labels)
    assert torch.equal(a, b) and all(torch.equal(la[k], lb[k]) for k in la)


def test_ssl_off_is_the_plain_next_token_step():
    student, teacher = Spy(tiny_gpt(0).eval()), Spy(build_teacher(tiny_gpt(1)))
    tokens, labels = make_batch()
    objective = STARObjective(ObjectiveConfig(projector_hidden=32, label_dropout=0.0), dim=128, n_layer=2)
    total, losses = objective(student, teacher, tokens, labels, null_class=5, ssl=False)
    assert set(losses) == {"ar"} and not teacher.seen
    seqs = tokens.flatten(0, 1)  # every view: the views stay at M past the switch
    plain = student.model(seqs[:, :-1], labels.repeat_interleave(2)).logits
    torch.testing.assert_close(total, ar_loss(plain, seqs))


def test_variant_settings_are_validated():
    with pytest.raises(ValueError, match="student_views"):
        ObjectiveConfig(student_views=3)
    with pytest.raises(ValueError, match="student_views below num_views needs"):
        ObjectiveConfig(mim=False, step=False, view=False, student_views=1)
    with pytest.raises(ValueError, match="masked_share"):
        ObjectiveConfig(masked_share=0.0)
    with pytest.raises(ValueError, match="ar_loss_on=unmasked needs"):
        ObjectiveConfig(ar_loss_on="unmasked")
    with pytest.raises(ValueError, match="ar_loss_on must be"):
        ObjectiveConfig(ar_loss_on="some")
    with pytest.raises(ValueError, match="ssl_until"):
        ObjectiveConfig(ssl_until=0.0)
    cfg = ObjectiveConfig(ssl_until=0.25)
    assert cfg.ssl_steps(10) == 2 and cfg.ssl_on(1, 10) and not cfg.ssl_on(2, 10)
    assert ObjectiveConfig().ssl_on(10**6, 10) and not ObjectiveConfig(mim=False, step=False, view=False).ssl_on(0, 10)


def test_ar_on_unmasked_always_leaves_an_unmasked_sequence():
    cfg = ObjectiveConfig(masked_share=0.75, ar_loss_on="unmasked")
    assert [cfg.masked_sequences(n) for n in (2, 4, 8)] == [1, 3, 6]  # round(1.5) = 2 of 2 would leave none
    assert ObjectiveConfig(masked_share=0.75).masked_sequences(2) == 2 and ObjectiveConfig().masked_sequences(5) == 5
    with pytest.raises(ValueError, match="at least 2 student sequences"):
        cfg.masked_sequences(1)
    student, teacher = tiny_gpt(0), build_teacher(tiny_gpt(1))
    tokens, labels = make_batch(B=1, M=2)
    _, (_, losses) = run_objective(cfg, student, teacher, tokens, labels)
    assert all(torch.isfinite(v) for v in losses.values())
