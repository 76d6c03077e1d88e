"""Training properties of docs/algorithm.md §7: losses, freezing, best epoch, determinism, failures."""

import math

import numpy as np
import pytest
import torch
from _helpers import small_jnf
from sklearn.exceptions import NotFittedError
from torch.optim.optimizer import register_optimizer_step_post_hook

import skjnf._fitting as fitting
import skjnf._training as training
from skjnf._batch import StageBatch
from skjnf._distributions import gaussian_log_prob
from skjnf._likelihoods import Bernoulli, Laplace, Normal
from skjnf._modules import (
    SUBSET_DRAWS,
    JNFModule,
    random_subset_masks,
    stage1_loss,
    stage2_loss,
    stage2_terms,
)


def _tiny_module(seed=0):
    torch.manual_seed(seed)
    likelihoods = [
        Normal(torch.full((3,), 0.7), learn=False),
        Laplace(torch.full((2,), 0.4), learn=False),
        Bernoulli(4),
    ]
    module = JNFModule(["a", "b", "c"], [(3,), (2,), (4,)], likelihoods, 2, (5,), ["maf"] * 3, 1, (6,))
    for flow in module.flows:  # non-trivial flows
        for p in flow.parameters():
            p.data.normal_(0, 0.3)
    return module.double()


def test_stage_losses_match_the_formulas_by_hand():
    module = _tiny_module()
    g = torch.Generator().manual_seed(1)
    blocks = {
        "a": torch.randn(7, 3, generator=g, dtype=torch.float64),
        "b": torch.randn(7, 2, generator=g, dtype=torch.float64),
        "c": torch.randint(0, 2, (7, 4), generator=g).double(),
    }
    noise = torch.randn(7, 2, generator=g, dtype=torch.float64)
    rescale, beta = [2.0, 1.0, 0.5], 0.3
    mean, log_var = module.joint_encoder([blocks["a"], blocks["b"], blocks["c"]])
    z = mean + torch.exp(0.5 * log_var) * noise
    normal = torch.distributions.Normal(module.decoders[0](z), 0.7).log_prob(blocks["a"]).sum(-1)
    laplace = torch.distributions.Laplace(module.decoders[1](z), 0.4).log_prob(blocks["b"]).sum(-1)
    bernoulli = torch.distributions.Bernoulli(logits=module.decoders[2](z)).log_prob(blocks["c"]).sum(-1)
    prior, posterior = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(mean, torch.exp(0.5 * log_var))
    kl = torch.distributions.kl_divergence(posterior, prior).sum(-1)
    expected = -(2.0 * normal + 1.0 * laplace + 0.5 * bernoulli) + beta * kl
    torch.testing.assert_close(stage1_loss(module, blocks, noise, rescale, beta), expected, atol=1e-6, rtol=0)

    k = SUBSET_DRAWS  # random subsets per row: noise is the latent draw, then k x (M + 1) columns
    noise2 = torch.randn(7, 2 + k * 4, generator=g, dtype=torch.float64)
    z2 = mean + torch.exp(0.5 * log_var) * noise2[:, :2]
    expected2 = 0
    for j, name in enumerate(["a", "b", "c"]):
        m, lv = module.encoders[j](blocks[name])
        u, log_det = module.flows[j](z2.detach())
        expected2 = expected2 - (torch.distributions.Normal(m, torch.exp(0.5 * lv)).log_prob(u).sum(-1) + log_det)
    u, log_det = module.subset_flow(z2.detach())
    for draw in range(k):
        mask = random_subset_masks(noise2[:, 2 + 4 * draw : 2 + 4 * (draw + 1)])
        assert mask.sum(1).eq(2).all()  # M = 3: every subset S has 2 modalities
        # the subset encoder reads each modality through the joint encoder's (frozen) trunk and
        # through a one-hidden-layer view of its own of the input
        inputs = [blocks[name] for name in ["a", "b", "c"]]
        features = [trunk(x) for trunk, x in zip(module.joint_encoder.trunks, inputs)]
        m, lv = module.subset_encoder(features, inputs, mask)
        subset_log_q = torch.distributions.Normal(m, torch.exp(0.5 * lv)).log_prob(u).sum(-1) + log_det
        expected2 = expected2 - subset_log_q / k
    torch.testing.assert_close(stage2_loss(module, StageBatch(blocks), noise2), expected2, atol=1e-6, rtol=0)
    # fit hands stage 2 the frozen joint posterior once, instead of re-encoding every batch
    cached = StageBatch(blocks, joint_mean=mean.detach(), joint_log_var=log_var.detach())
    torch.testing.assert_close(stage2_loss(module, cached, noise2), expected2, atol=1e-6, rtol=0)
    # ... and the frozen trunks' features, which the subset posterior reads
    frozen = fitting._with_joint_posterior(module, StageBatch(blocks))
    assert frozen.trunk_features.shape == (7, 3 * 5)
    torch.testing.assert_close(stage2_loss(module, frozen, noise2), expected2, atol=1e-6, rtol=0)


def test_random_subsets_cover_every_size_and_every_modality():
    noise = torch.randn(20_000, 5 + 1, generator=torch.Generator().manual_seed(0))
    mask = random_subset_masks(noise)
    sizes = mask.sum(1)
    counts = torch.bincount(sizes.long(), minlength=6)
    # sizes 2..M-1 = 2, 3, 4, uniformly; never 0, 1 or M (those have their own posteriors)
    assert counts[[0, 1, 5]].sum() == 0
    assert torch.allclose(counts[2:5].double() / len(mask), torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02)
    # each modality is in S as often as any other: E|S| / M = 3 / 5
    assert torch.allclose(mask.mean(0), torch.full((5,), 0.6), atol=0.02)
    assert torch.equal(random_subset_masks(noise), mask)  # fixed noise, fixed subsets


def test_fused_adam_makes_the_same_updates_as_adam():
    torch.manual_seed(0)
    params = [torch.randn(30, 20, requires_grad=True), torch.randn(20, requires_grad=True)]
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    initial = [p.detach().clone() for p in params]
    ours, plain = training.fused_adam(params, lr=0.01), torch.optim.Adam(copies, lr=0.01)
    directions = [torch.randn_like(p) for p in params]
    for step in range(5):
        grads = [(step + 1.0) * d for d in directions]  # steady directions: every entry keeps moving
        for group, grad in ((params, grads), (copies, grads)):
            for p, g in zip(group, grad):
                p.grad = g.clone()
        ours.step()
        plain.step()
    for p, q, start in zip(params, copies, initial):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)
        assert (p - start).abs().min() > 0.01  # five steps of lr 0.01 moved every entry


def test_adam_moments_of_a_weight_whose_gradient_stopped_never_turn_subnormal():
    # A weight whose gradient becomes zero for good (a dead ReLU unit) keeps a first moment that
    # decays by 0.9 a step: 0.1 * 0.9**899 ~ 8e-43 after 900 steps, a float32 subnormal, on which
    # CPUs compute many times slower. The optimizer zeroes it instead; a live weight is untouched.
    param, copy = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    ours, plain = training.fused_adam([param], lr=1e-3), torch.optim.Adam([copy], lr=1e-3)
    for step in range(900):
        grad = torch.tensor([1.0 if step == 0 else 0.0, 1.0])
        param.grad, copy.grad = grad.clone(), grad.clone()
        ours.step()
        plain.step()
    tiny = torch.finfo(torch.float32).tiny
    assert 0 < plain.state[copy]["exp_avg"][0] < tiny  # the premise: plain Adam's moment is subnormal
    assert ours.state[param]["exp_avg"][0] == 0
    torch.testing.assert_close(ours.state[param]["exp_avg"][1], plain.state[copy]["exp_avg"][1])
    torch.testing.assert_close(ours.state[param]["exp_avg_sq"], plain.state[copy]["exp_avg_sq"])
    torch.testing.assert_close(param, copy)


def test_a_dead_weight_under_weight_decay_never_turns_subnormal():
    # AdamW with lr 0.5 and decay 1 halves a weight without gradient each step: 0.5**140 ~ 7e-43.
    param, copy = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    ours = training.fused_adam([param], lr=0.5, weight_decay=1.0)
    plain = torch.optim.AdamW([copy], lr=0.5, weight_decay=1.0)
    for _ in range(140):
        grad = torch.tensor([0.0, 1.0])
        param.grad, copy.grad = grad.clone(), grad.clone()
        ours.step()
        plain.step()
    assert 0 < copy[0] < torch.finfo(torch.float32).tiny  # the premise
    assert param[0] == 0
    torch.testing.assert_close(param[1], copy[1])


def _joint_state(module):
    return {n: p.detach().clone() for part in module.joint_parts() for n, p in part.named_parameters()}


def _expert_state(module):
    return {n: p.detach().clone() for part in module.expert_parts() for n, p in part.named_parameters()}


def test_stage2_leaves_the_joint_part_bit_identical(views, monkeypatch):
    X, _, _ = views
    snapshots, original = {}, fitting._train_stage

    def spy(module, stage, *args, **kwargs):
        if stage == "flows":  # stage 1 finished, its best weights restored
            snapshots["joint"], snapshots["experts"] = _joint_state(module), _expert_state(module)
        return original(module, stage, *args, **kwargs)

    monkeypatch.setattr(fitting, "_train_stage", spy)
    jnf = small_jnf(joint_epochs=3, flow_epochs=3, likelihood={"c": "laplace"}, likelihood_scale="learn").fit(X)
    after = _joint_state(jnf.module_)
    assert any("rho" in n for n in after)  # learned scales are part of the frozen state
    for name, tensor in after.items():
        assert torch.equal(tensor, snapshots["joint"][name]), name
    for part in jnf.module_.joint_parts():
        assert all(p.grad is None for p in part.parameters())
        assert not any(p.requires_grad for p in part.parameters())  # the fitted module is frozen once
    experts = _expert_state(jnf.module_)
    assert any(not torch.equal(experts[n], snapshots["experts"][n]) for n in experts)


def test_best_epoch_is_restored(views, monkeypatch):
    X, _, _ = views
    stages, original = [], training.train_stage

    def spy(stage, train, valid, **kwargs):
        stages.append((stage, valid))
        return original(stage, train, valid, **kwargs)

    monkeypatch.setattr(fitting, "train_stage", spy)
    monkeypatch.setattr(fitting, "DECODER_SHARES", np.array([1.0]))  # decoders as stage 1 left them
    # a fixed scale: "auto" is recalibrated after stage 1, so its validation loss would differ from the recorded one
    jnf = small_jnf(joint_epochs=12, flow_epochs=12, lr=3e-2, likelihood_scale=0.7, rescale_likelihoods=False).fit(X)
    for (stage, valid), key in zip(stages, ("joint", "flows")):
        with torch.no_grad():
            jnf.module_.eval()
            recomputed = stage.mean_part_losses(valid, 64)
        epochs = jnf.history_[key]["epochs"]
        parts = (
            [
                [math.inf if row["part_losses"][i] is None else row["part_losses"][i] for row in epochs]
                for i in range(len(recomputed))
            ]
            if key == "flows"
            else [[row["valid_loss"] for row in epochs]]
        )
        for value, losses in zip(recomputed, parts):  # each part's restored weights give its minimum
            assert value == pytest.approx(min(losses), rel=1e-5, abs=1e-5)
        best = jnf.history_[key]["best_epoch"]
        assert best == max(int(np.argmin(losses)) + 1 for losses in parts)
    # with lr this high the last epoch is not always the best: the test exercises a restore
    assert any(jnf.history_[k]["best_epoch"] < 12 for k in ("joint", "flows"))


def test_same_seed_is_bit_identical_and_global_rng_untouched(views):
    X, _, _ = views
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
    fits = [small_jnf(joint_epochs=3, flow_epochs=3, random_state=7).fit(X) for _ in range(2)]
    other = small_jnf(joint_epochs=3, flow_epochs=3, random_state=8).fit(X)
    states = [f.module_.state_dict() for f in fits]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], other.module_.state_dict()[k]) for k in states[0])
    calls = [
        lambda f: f.transform(X),
        lambda f: f.transform(X, cond_mod="a"),
        lambda f: f.transform(X, cond_mod=["a", "b"]),
        lambda f: f.sample_latent(X, 2, cond_mod=["b", "c"]),
        lambda f: f.predict({"a": X["a"]})["c"],
        lambda f: f.score_samples(X),
        lambda f: f.sample(3)["b"],
    ]
    for call in calls:
        np.testing.assert_array_equal(call(fits[0]), call(fits[1]))
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:2], numpy_state[1:2]))


def test_divergence_raises_and_leaves_no_half_fitted_state(views):
    X, _, _ = views
    fresh = small_jnf(lr=1e6, joint_epochs=5)
    with pytest.raises(FloatingPointError, match=r"stage 1 \(joint VAE\), epoch \d+"):
        fresh.fit(X)
    with pytest.raises(NotFittedError):
        fresh.transform(X)
    fitted = small_jnf(joint_epochs=2, flow_epochs=2).fit(X)
    before = fitted.transform(X), fitted.score_samples(X)
    with pytest.raises(FloatingPointError):
        fitted.set_params(lr=1e6).fit(X)
    np.testing.assert_array_equal(fitted.transform(X), before[0])
    np.testing.assert_array_equal(fitted.score_samples(X), before[1])


def test_nan_in_stage2_names_the_stage(views, monkeypatch):
    X, _, _ = views

    def poisoned(module, batch, noise, **kwargs):
        experts, subset = stage2_terms(module, batch, noise, **kwargs)
        return {name: term * float("nan") for name, term in experts.items()}, subset

    monkeypatch.setattr(fitting, "stage2_terms", poisoned)
    with pytest.raises(FloatingPointError, match=r"stage 2 \(flows\), epoch 1, batch 1"):
        small_jnf(joint_epochs=1, flow_epochs=2).fit(X)


def test_keyboard_interrupt_leaves_previous_fit_intact(views, monkeypatch):
    X, _, _ = views
    fitted = small_jnf(joint_epochs=2, flow_epochs=2).fit(X)
    before = fitted.transform(X)

    def interrupted(module, batch, noise, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fitting, "stage2_terms", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fitted.set_params(random_state=3).fit(X)
    np.testing.assert_array_equal(fitted.transform(X), before)


def _global_norm(grads):
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])))


def test_gradients_are_clipped_before_the_step(views, monkeypatch):
    X, _, _ = views
    X = {m: 1000 * b for m, b in X.items()}  # raw gradients far above the clipping norm
    pre_clip, at_step = [], []
    original = training.ClipGradNorm.on_grad_computed

    def record(self, net, named_parameters, **kwargs):
        named_parameters = list(named_parameters)
        pre_clip.append(_global_norm([p.grad for _, p in named_parameters if p.grad is not None]))
        return original(self, net, named_parameters, **kwargs)

    def step_hook(optimizer, args, kwargs):  # after step(closure): the gradients the step used
        params = [p for group in optimizer.param_groups for p in group["params"]]
        at_step.append(_global_norm([p.grad for p in params if p.grad is not None]))

    monkeypatch.setattr(training.ClipGradNorm, "on_grad_computed", record)
    handle = register_optimizer_step_post_hook(step_hook)
    try:
        small_jnf(joint_epochs=2, flow_epochs=1, likelihood_scale=1.0).fit(X)
    finally:
        handle.remove()
    assert max(pre_clip) > training.MAX_GRAD_NORM
    assert max(at_step) <= training.MAX_GRAD_NORM * (1 + 1e-6)  # float32 rounding of the clip factor
    assert len(at_step) == len(pre_clip)


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_gradient_clipping_is_torchs_below_and_above_the_limit(scale):
    """Catches a clip factor off by the norm, clipping below the limit, or a tensor left unscaled."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(30, 20), (20,), (7, 3)]]
    grads = [scale * torch.randn(p.shape, generator=generator) for p in params]
    copies = [torch.nn.Parameter(torch.zeros(p.shape)) for p in params]
    for p, q, g in zip(params, copies, grads):
        p.grad, q.grad = g.clone(), g.clone()
    training.ClipGradNorm(10.0).on_grad_computed(None, [(str(i), p) for i, p in enumerate(params)])
    torch.nn.utils.clip_grad_norm_(copies, 10.0)
    for p, q in zip(params, copies):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert (_global_norm([p.grad for p in params]) < 10.0 * (1 + 1e-6)) and (scale < 1 or _global_norm(grads) > 10)


def test_zero_epochs_warn(views):
    X, _, _ = views
    with pytest.warns(UserWarning, match=r"stage 2 \(flows\) runs for 0 epochs"):
        jnf = small_jnf(joint_epochs=1, flow_epochs=0).fit(X)
    assert jnf.history_["flows"]["epochs"] == []
    assert math.isfinite(jnf.score(X))


# 216 training rows: 27 steps per epoch at batch 8 (10 epochs are 270 steps), 7 at batch 32,
# where 100 steps take 15 epochs
@pytest.mark.parametrize("batch_size, patience", [(8, training.PATIENCE), (32, 15)])
def test_early_stopping_waits_ten_epochs_and_a_hundred_steps(views, batch_size, patience):
    X, _, _ = views
    jnf = small_jnf(joint_epochs=2, flow_epochs=200, early_stopping=True, lr=0.05, batch_size=batch_size).fit(X)
    n_epochs = len(jnf.history_["flows"]["epochs"])
    assert n_epochs < 200
    assert n_epochs - jnf.history_["flows"]["best_epoch"] == patience


def test_no_validation_set_selects_by_training_loss(views):
    X, _, _ = views
    jnf = small_jnf(validation_fraction=0.0, joint_epochs=3, flow_epochs=3).fit(X)
    losses = [row["train_loss"] for row in jnf.history_["joint"]["epochs"]]
    assert jnf.history_["joint"]["monitor"] == "train_loss"
    assert jnf.history_["joint"]["best_epoch"] == int(np.argmin(losses)) + 1


def test_too_few_rows_for_validation_warn():
    X = {"a": np.arange(4.0).reshape(2, 2), "b": np.arange(2.0).reshape(2, 1)}
    with pytest.warns(UserWarning, match="no validation set"):
        small_jnf(validation_fraction=0.9, joint_epochs=1, flow_epochs=1).fit(X)


def test_fit_warnings_name_the_users_call():
    """fit's warnings, raised several frames deep in skjnf under scikit-learn's fit wrapper, name
    this file (a fixed stacklevel broke whenever a helper moved)."""
    X = {"a": np.arange(4.0).reshape(2, 2), "b": np.arange(2.0).reshape(2, 1)}
    with pytest.warns(UserWarning) as caught:
        small_jnf(validation_fraction=0.9, joint_epochs=1, flow_epochs=0).fit(X)
    messages = {str(w.message)[:30]: w.filename for w in caught}
    assert any("no validation set" in str(w.message) for w in caught)
    assert any("runs for 0 epochs" in str(w.message) for w in caught)
    assert set(messages.values()) == {__file__}, messages


def test_gaussian_log_prob_matches_torch():
    g = torch.Generator().manual_seed(0)
    x, m, lv = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    expected = torch.distributions.Normal(m, torch.exp(0.5 * lv)).log_prob(x).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(x, m, lv), expected)


def test_verbose_reports_why_a_stage_stopped_and_which_epoch_it_kept(views, capsys):
    X, _, _ = views
    jnf = small_jnf(joint_epochs=2, flow_epochs=200, lr=0.05, verbose=1).fit(X)
    out = capsys.readouterr().out
    n_epochs, best = len(jnf.history_["flows"]["epochs"]), jnf.history_["flows"]["best_epoch"]
    # 216 training rows in batches of 32: 7 steps an epoch, 15 epochs to wait 100 steps
    stopped = f"Early stopping stage 2 (flows) at epoch {n_epochs}: no part improved its validation loss"
    assert f"{stopped} for 15 epochs (105 steps)" in out
    assert f"stage 2 (flows): kept the weights of epoch {best} of {n_epochs}" in out
    assert "stage 1 (joint VAE): kept the weights of epoch" in out


def test_each_stage2_part_stops_on_its_own(views, monkeypatch):
    """Catches a stopped part still trained (or still evaluated), a part stopped before its own
    patience ran out, or the stage ending while a part still improves: part i is evaluated up to
    its best epoch + patience, not after, and is left out of every later training step."""
    X, _, _ = views
    monkeypatch.setattr(training, "PATIENCE", 3)
    monkeypatch.setattr(training, "PATIENCE_STEPS", 1)
    calls = []
    original = fitting.stage2_terms

    def spy(module, batch, noise, **kwargs):
        calls.append(list(kwargs["active"]))
        return original(module, batch, noise, **kwargs)

    monkeypatch.setattr(fitting, "stage2_terms", spy)
    for seed in range(5):  # the first fit whose parts stop at different epochs (seed 0 may not)
        calls.clear()
        jnf = small_jnf(joint_epochs=5, flow_epochs=40, lr=3e-2, random_state=seed).fit(X)
        history = jnf.history_["flows"]
        rows, best = history["epochs"], [*history["expert_best_epoch"].values(), history["subset_best_epoch"]]
        if len(set(best)) > 1:
            break
    for i, kept in enumerate(best):
        evaluated = [row["epoch"] for row in rows if row["part_losses"][i] is not None]
        assert evaluated == list(range(1, min(kept + 3, len(rows)) + 1))
    stops = [kept + 3 for kept in best]
    assert min(stops) < len(rows) == max(stops)  # a part stopped before the stage, which ended with the last one
    # the same number of stage-2 passes every epoch (training batches, then validation batches)
    per_epoch = len(calls) // len(rows)
    assert per_epoch * len(rows) == len(calls)
    for i, stop in enumerate(stops):
        computed = [calls[e * per_epoch][i] for e in range(len(rows))]
        assert computed == [epoch <= stop for epoch in range(1, len(rows) + 1)]
        assert all(calls[e * per_epoch + b][i] == computed[e] for e in range(len(rows)) for b in range(per_epoch))


class _ModeRecordingTrunk(torch.nn.Module):
    """A user's trunk with dropout: records (its mode, its dropout's mode, grad enabled, in a
    validation pass) at every forward call."""

    modes: list = []
    validating = False

    def __init__(self, in_shape):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(in_shape[0], 8), torch.nn.Dropout(0.1))

    def forward(self, x):
        record = (self.training, self.net[1].training, torch.is_grad_enabled(), _ModeRecordingTrunk.validating)
        type(self).modes.append(record)
        return self.net(x)


class _OwnTrainTrunk(_ModeRecordingTrunk):
    """The same, overriding ``train`` (a network may, e.g. to keep a part frozen)."""

    modes: list = []

    def train(self, mode=True):
        return super().train(mode)


@pytest.mark.parametrize("trunk", [_ModeRecordingTrunk, _OwnTrainTrunk])
def test_training_steps_run_in_train_mode_and_validation_in_eval_mode(views, trunk, monkeypatch):
    """The stage module switches its submodules' modes only when the mode changes: catches a
    submodule left out of the switch (the dropout layer inside a user's trunk keeps the wrong
    mode), a user's own ``train`` not called, or validation run in train mode."""
    trunk.modes.clear()
    original = training.StageNet.validation_step

    def validation_step(net, batch, **fit_params):
        _ModeRecordingTrunk.validating = True
        try:
            return original(net, batch, **fit_params)
        finally:
            _ModeRecordingTrunk.validating = False

    monkeypatch.setattr(training.StageNet, "validation_step", validation_step)
    model = small_jnf(
        joint_epochs=3, flow_epochs=1, validation_fraction=0.25, early_stopping=False, networks={"a": {"trunk": trunk}}
    )
    model.fit(views[0])
    steps = [r for r in trunk.modes if r[2]]  # stage 1's training steps: the only calls with gradients
    validation = [r for r in trunk.modes if r[3]]
    assert len(steps) >= 3 and all(r == (True, True, True, False) for r in steps)
    assert len(validation) >= 3 and all(r == (False, False, False, True) for r in validation)
