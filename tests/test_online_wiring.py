"""The online methods' wiring: each method's real ``step(engine, prompts)`` driven by a fake engine whose policy is a
table of per-token log-prob offsets (so the gradient of the loss is the gradient with respect to each log-prob), with
known reference log-probs, values and scores. Every loss handed to ``engine.optimizer_step``, its gradient and the
number of optimizer steps are checked against a restatement written here from the papers / the authors' code (trlx
and TRL for PPO, the P3O paper, liziniu/ReMax ``compute_returns``, OpenRLHF for REINFORCE++, TRL's OnlineDPO / XPO
trainers), never by calling aligntool's own loss functions. Then the real engine's log-prob / value positions against a
plain forward pass of the tiny model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import RECIPES

from aligntool import registry

WIDTH = 5  # response tokens per row (rows are shorter: random lengths 1..WIDTH)
LR = 0.3  # the fake optimizer's SGD step on the log-prob offsets: later epochs see ratios != 1, clipping is active


def rollout_class():
    """The engine's Rollout (the one import of the engine's internals here; repoint it if the engine moves)."""
    from aligntool.online.rollout import Rollout

    return Rollout


# method name -> its class in the method module (reached through the registry, not the module path)
CLASSES = {"ppo": "PPO", "p3o": "P3O", "remax": "ReMax", "reinforce_pp": "ReinforcePP", "online_dpo": "OnlineDPO",
           "xpo": "XPO"}


def method_for(name: str, **algo):
    mod = registry.get(name).load()
    cfg = mod.AlgoConfig(**algo)
    cls = getattr(mod, CLASSES[name])
    return (cls(cfg, Preferences()) if name in ("online_dpo", "xpo") else cls(cfg)), cfg


# ----------------------------------------------------------------------------------------------------- fake engine
@dataclasses.dataclass
class Row:
    """What the fake world knows of one sampled response."""

    prompt: str
    length: int
    base_logp: np.ndarray  # (WIDTH,) log-prob of each token under the policy at delta = 0
    ref_logp: np.ndarray
    value: np.ndarray  # (WIDTH,) the value head's output at delta_v = 0 (garbage beyond the length, as the engine's)
    score: float
    greedy: bool
    from_reference: bool


class Preferences:
    """The preference source of online DPO / XPO: the first text wins when its hidden score is >= (TRL: a tie goes
    to the first sample)."""

    scores: dict = {}

    def prefer(self, prompts, a_texts, b_texts, pa=None, pb=None):
        pa, pb = pa or [0.0] * len(a_texts), pb or [0.0] * len(b_texts)  # penalties (missing EOS) off the scores
        wins = [self.scores[a] - x >= self.scores[b] - y for a, b, x, y in zip(a_texts, b_texts, pa, pb)]
        return wins, [float(w) for w in wins]


class FakeEngine:
    """The step API of aligntool.online.engine.Engine on a table policy: log pi(row, t) = base(row, t) + delta[row, t],
    V(row, t) = value(row, t) + delta_v[row, t]. ``optimizer_step`` records the loss, its gradient with respect to
    delta / delta_v and the rows of the forward that built it, then takes an SGD step."""

    def __init__(self, cfg, seed=0, kl_coef=None, iteration=3):
        self.cfg, self.world, self.iterations = cfg, 1, 10
        self.state = {"iteration": iteration, "kl_coef": getattr(cfg, "kl_coef", 0.0) if kl_coef is None else kl_coef}
        self.rng = np.random.default_rng(seed)
        self.rows: list[Row] = []
        self.delta = torch.zeros(64, WIDTH, dtype=torch.float64, requires_grad=True)
        self.delta_v = torch.zeros(64, WIDTH, dtype=torch.float64, requires_grad=True)
        self.steps: list[dict] = []
        self._forward_rows: list[int] = []
        Preferences.scores = {}

    # ---- sampling
    def _new_row(self, prompt, greedy=False, from_reference=False) -> int:
        g, i = self.rng, len(self.rows)
        length = int(g.integers(1, WIDTH + 1))
        base = np.log(g.uniform(0.05, 0.95, WIDTH))
        ref = base + g.normal(0, 0.4, WIDTH)  # the policy has drifted from the reference: KL terms are not 0
        self.rows.append(Row(prompt, length, base, ref, g.normal(0, 1, WIDTH), float(g.normal(0, 2)), greedy,
                             from_reference))
        Preferences.scores[f"row{i}"] = self.rows[i].score
        return i

    def _rollout(self, ids: list[int]):
        mask = torch.tensor([[1.0 if t < self.rows[i].length else 0.0 for t in range(WIDTH)] for i in ids],
                            dtype=torch.float64)
        input_ids = torch.tensor([[i, 0] for i in ids])  # column 0: the row's id in the fake world
        missing_eos = torch.tensor([self.rows[i].length == WIDTH for i in ids])  # cut off at the length limit
        return rollout_class()([self.rows[i].prompt for i in ids], [f"row{i}" for i in ids], input_ids,
                               torch.ones_like(input_ids), 1, mask, missing_eos)

    def samples(self, prompts, kinds, from_reference=False):
        return [self._rollout([self._new_row(p, k == "greedy", from_reference) for p in prompts]) for k in kinds]

    def sample(self, prompts, from_reference=False, greedy=False):
        return self.samples(prompts, ["greedy" if greedy else "sample"], from_reference)[0]

    def sample_groups(self, prompts, n):  # rows n*j .. n*j + n - 1 answer prompts[j], as the engine's
        return self.sample([p for p in prompts for _ in range(n)])

    @staticmethod
    def ids(ro) -> list[int]:
        return ro.input_ids[:, 0].tolist()

    def score(self, ro):
        return torch.tensor([self.rows[i].score for i in self.ids(ro)], dtype=torch.float64)

    def ref_logprobs(self, ro):
        return torch.tensor(np.stack([self.rows[i].ref_logp for i in self.ids(ro)])) * ro.mask

    def policy_logprobs(self, ro, grad=False):
        ids = self.ids(ro)
        base = torch.tensor(np.stack([self.rows[i].base_logp for i in ids]))
        value = torch.tensor(np.stack([self.rows[i].value for i in ids]))
        with torch.set_grad_enabled(grad):
            logp = (base + self.delta[ids]) * ro.mask
            values = value + self.delta_v[ids]  # not masked, as the engine's
        if grad:
            self._forward_rows += ids
        return (logp, values) if grad else (logp.detach(), values.detach())

    def rollout(self, prompts, per_prompt=1):
        ro = self.sample_groups(prompts, per_prompt)
        ro = ro.with_(score=self.score(ro))
        logp, values = self.policy_logprobs(ro)
        return ro.with_(logp=logp, values=values, logp_ref=self.ref_logprobs(ro))

    # ---- updates and collectives (one process)
    def optimizer_step(self, loss):
        g, gv = torch.autograd.grad(loss, [self.delta, self.delta_v], allow_unused=True)
        g = torch.zeros_like(self.delta) if g is None else g
        gv = torch.zeros_like(self.delta_v) if gv is None else gv
        self.steps.append({"loss": loss.item(), "grad": g.clone(), "grad_v": gv.clone(),
                           "rows": sorted(set(self._forward_rows))})
        self._forward_rows = []
        with torch.no_grad():
            self.delta -= LR * g
            self.delta_v -= LR * gv
        return float(torch.cat([g.ravel(), gv.ravel()]).norm())

    def all_sum(self, t):
        return t

    def global_mean(self, t):
        return t.detach().double().mean().item()

    def token_denominator(self, mask):
        return mask.sum().clamp(min=1)

    def rollout_stats(self, ro):
        return {}

    def note_completions(self, rows):
        pass

    def log(self, row):
        pass

    # ---- what a reference restatement needs
    def table(self, ids):
        """(mask, base log-probs (masked), reference log-probs (masked), values (unmasked), scores) as float64."""
        rows = [self.rows[i] for i in ids]
        mask = np.array([[1.0 if t < r.length else 0.0 for t in range(WIDTH)] for r in rows])
        return (mask, np.stack([r.base_logp for r in rows]) * mask, np.stack([r.ref_logp for r in rows]) * mask,
                np.stack([r.value for r in rows]), np.array([r.score for r in rows]))


def sampled_rows(engine, greedy=False, from_reference=False):
    return [i for i, r in enumerate(engine.rows) if r.greedy == greedy and r.from_reference == from_reference]


def replay(engine, loss_fn, value_head=False):
    """Check every recorded optimizer step against ``loss_fn(delta, delta_v, rows) -> loss`` (a torch function of the
    offsets written here): same loss, same gradient; then the same SGD step, so later steps start where the method's
    did. Returns the number of steps."""
    delta = torch.zeros(64, WIDTH, dtype=torch.float64, requires_grad=True)
    delta_v = torch.zeros(64, WIDTH, dtype=torch.float64, requires_grad=True)
    for k, step in enumerate(engine.steps):
        loss = loss_fn(delta, delta_v, step["rows"])
        g, gv = torch.autograd.grad(loss, [delta, delta_v], allow_unused=True)
        g = torch.zeros_like(delta) if g is None else g
        gv = torch.zeros_like(delta_v) if gv is None else gv
        assert step["loss"] == pytest.approx(loss.item(), rel=1e-6, abs=1e-9), k
        assert torch.allclose(step["grad"], g, rtol=1e-6, atol=1e-10), (k, (step["grad"] - g).abs().max())
        if value_head:
            assert torch.allclose(step["grad_v"], gv, rtol=1e-6, atol=1e-10), k
        if k == 0:  # a loss that could not move the policy would pass anything
            assert step["grad"].abs().sum() > 0
        with torch.no_grad():
            delta -= LR * g
            delta_v -= LR * gv
    return len(engine.steps)


def t64(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


PROMPTS = [f"prompt {i}" for i in range(4)]


# ------------------------------------------------------------------------------------------------------------- PPO
def ppo_reference(mask, logp, ref, values, score, kl_coef, gamma, lam, whiten):
    """trlx / TRL PPO, one row at a time: rewards -kl_coef (logp - ref) per token + the score on the last; GAE with
    V = 0 after the last token; advantages whitened over the batch's tokens (population variance, as aligntool
    documents it; TRL's masked_whiten uses the unbiased one)."""
    n = mask.shape[0]
    adv, ret = np.zeros_like(logp), np.zeros_like(logp)
    for i in range(n):
        T = int(mask[i].sum())
        r = [-kl_coef * (logp[i, t] - ref[i, t]) for t in range(T)]
        r[T - 1] += score[i]
        last = 0.0
        for t in reversed(range(T)):
            nv = values[i, t + 1] if t + 1 < T else 0.0
            delta = r[t] + gamma * nv - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t], ret[i, t] = last, last + values[i, t]
    if whiten:
        a = adv[mask > 0]
        adv = (adv - a.mean()) / math.sqrt(a.var() + 1e-8) * mask
    return adv, ret


@pytest.mark.parametrize("algo", [{}, {"num_minibatches": 2, "ppo_epochs": 2, "kl_target": None},
                                  {"whiten_advantages": False, "ppo_epochs": 1, "gamma": 0.9, "lam": 0.8}])
def test_ppo_step_hands_the_optimizer_the_clipped_ppo_loss(algo):
    method, cfg = method_for("ppo", **algo)
    engine = FakeEngine(cfg, seed=1)
    kl0 = engine.state["kl_coef"]
    method.step(engine, PROMPTS)
    ids = sampled_rows(engine)
    assert len(ids) == len(PROMPTS)
    mask, logp, ref, values, score = engine.table(ids)
    adv, ret = ppo_reference(mask, logp, ref, values * mask, score, kl0, cfg.gamma, cfg.lam, cfg.whiten_advantages)
    pos = {i: k for k, i in enumerate(ids)}
    eps, eps_v = cfg.clip_range, cfg.clip_range_value
    v_old = values  # at the rollout (delta_v = 0)

    def loss_fn(delta, delta_v, rows):
        k = [pos[i] for i in rows]
        m, old = t64(mask[k]), t64(logp[k])
        new = (old + delta[rows]) * m
        ratio = torch.exp(new - old)
        A = t64(adv[k])
        pg = -(torch.min(ratio * A, ratio.clamp(1 - eps, 1 + eps) * A) * m).sum() / m.sum()
        V, Vold, R = t64(v_old[k]) + delta_v[rows], t64(v_old[k]), t64(ret[k])
        Vc = Vold + (V - Vold).clamp(-eps_v, eps_v)
        vl = 0.5 * (torch.max((V - R) ** 2, (Vc - R) ** 2) * m).sum() / m.sum()
        return pg + cfg.vf_coef * vl

    assert replay(engine, loss_fn, value_head=True) == cfg.ppo_epochs * cfg.num_minibatches
    assert method.updates_per_iteration == cfg.ppo_epochs * cfg.num_minibatches
    # every pass covers each row once, in num_minibatches minibatches
    per_pass = [engine.steps[e * cfg.num_minibatches : (e + 1) * cfg.num_minibatches] for e in range(cfg.ppo_epochs)]
    for steps in per_pass:
        assert sorted(i for s in steps for i in s["rows"]) == ids
        assert all(len(s["rows"]) == len(ids) // cfg.num_minibatches for s in steps)  # equal minibatches
    # the adaptive KL controller (Ziegler et al. 2019): beta *= 1 + clip(KL / target - 1, +-0.2) * n / horizon
    kl = ((logp - ref) * mask).sum(-1).mean()
    expected = kl0 if not cfg.kl_target else kl0 * (
        1 + min(0.2, max(-0.2, kl / cfg.kl_target - 1)) * len(PROMPTS) / cfg.kl_horizon)
    assert engine.state["kl_coef"] == pytest.approx(expected, rel=1e-9)
    if cfg.kl_target:
        assert engine.state["kl_coef"] != kl0


# ------------------------------------------------------------------------------------------------------------- P3O
@pytest.mark.parametrize("variant", ["separate", "joint"])
def test_p3o_step_hands_the_optimizer_the_pairwise_clipped_loss(variant):
    method, cfg = method_for("p3o", variant=variant, ppo_epochs=3)
    engine = FakeEngine(cfg, seed=2)
    method.step(engine, PROMPTS)
    ids = sampled_rows(engine)
    assert len(ids) == 2 * len(PROMPTS)
    assert [engine.rows[i].prompt for i in ids] == [p for p in PROMPTS for _ in range(2)]
    mask, logp, ref, _, score = engine.table(ids)
    # Wu et al. 2023: r_i = score_i - beta * sum_t (log pi - log pi_ref); A = (r1 - r2) / 2; sequence ratios
    reward = score - cfg.kl_coef * ((logp - ref) * mask).sum(-1)
    A = t64((reward[0::2] - reward[1::2]) / 2)
    eps = cfg.clip_range
    clip = lambda x: x.clamp(1 - eps, 1 + eps)  # noqa: E731

    def loss_fn(delta, delta_v, rows):
        assert rows == ids
        log_rho = (delta[ids] * t64(mask)).sum(-1)
        r1, r2 = log_rho[0::2], log_rho[1::2]
        if variant == "separate":
            j = torch.min(r1.exp() * A, clip(r1.exp()) * A) + torch.min(r2.exp() * -A, clip(r2.exp()) * -A)
        else:
            R = (r1 - r2).exp()
            j = torch.min(R * A, clip(R) * A)
        return -j.mean()

    assert replay(engine, loss_fn) == cfg.ppo_epochs == method.updates_per_iteration


# ----------------------------------------------------------------------------------------------------------- ReMax
@pytest.mark.parametrize("algo", [{}, {"gamma": 1.0, "kl_coef": 0.0, "reward_clip": None}, {"reward_clip": 0.5}])
def test_remax_step_hands_the_optimizer_reinforce_with_the_greedy_baseline(algo):
    method, cfg = method_for("remax", **algo)
    engine = FakeEngine(cfg, seed=3)
    method.step(engine, PROMPTS)
    ids, greedy = sampled_rows(engine), sampled_rows(engine, greedy=True)
    assert len(ids) == len(greedy) == len(PROMPTS)
    assert [engine.rows[i].prompt for i in greedy] == [engine.rows[i].prompt for i in ids] == PROMPTS
    mask, logp, ref, _, score = engine.table(ids)
    greedy_score = engine.table(greedy)[4]
    # liziniu/ReMax compute_returns: kl = -kl_ctl (logp - ref); reward_clip = clamp(r - r_greedy, +-c); walking back
    # from the last token, cumulative_reward *= gamma; returns[t] = kl[t] + cumulative_reward
    R = np.zeros_like(logp)
    for i in range(len(ids)):
        dr = score[i] - greedy_score[i]
        cum = dr if cfg.reward_clip is None else float(np.clip(dr, -cfg.reward_clip, cfg.reward_clip))
        for t in reversed(range(int(mask[i].sum()))):
            cum *= cfg.gamma
            R[i, t] = -cfg.kl_coef * (logp[i, t] - ref[i, t]) + cum

    def loss_fn(delta, delta_v, rows):  # compute_loss: -sum(R * logp * mask) / sum(mask)
        assert rows == ids
        m = t64(mask)
        return -(t64(R) * (t64(logp) + delta[ids]) * m).sum() / m.sum()

    assert replay(engine, loss_fn) == 1 == method.updates_per_iteration


# ---------------------------------------------------------------------------------------------------- REINFORCE++
def openrlhf_advantages(mask, logp, ref, score, prompts, cfg, kl_coef):
    """OpenRLHF: reinforce_baseline subtracts the prompt's mean reward; compute_approx_kl(log pi_old, log pi_ref)
    (k1 / k2 / k3, clamp +-10); compute_reward: clip(r) on the last action token - kl_coef * kl; cumulative returns;
    global (A - mean) / std over the batch's action tokens."""
    score = score.copy()
    if cfg.baseline == "group":
        for p in set(prompts):
            rows = [i for i, q in enumerate(prompts) if q == p]
            score[rows] -= score[rows].mean()
    d = logp - ref
    kl = {"k1": d, "k2": d**2 / 2, "k3": np.exp(-d) - 1 + d}[cfg.kl_estimator]
    kl = np.clip(kl, -10, 10) * mask if cfg.kl_in == "reward" else np.zeros_like(d)
    if cfg.reward_clip is not None:
        score = np.clip(score, -cfg.reward_clip, cfg.reward_clip)
    G = np.zeros_like(logp)
    for i in range(len(score)):
        T = int(mask[i].sum())
        r = [-kl_coef * kl[i, t] for t in range(T)]
        r[T - 1] += score[i]
        run = 0.0
        for t in reversed(range(T)):
            run = r[t] + cfg.gamma * run
            G[i, t] = run
    a = G[mask > 0]
    A = (G - a.mean()) * mask
    if cfg.normalize_std:
        A = A / math.sqrt(max(a.var(), 1e-8))
    return A


@pytest.mark.parametrize("algo", [
    {},
    {"num_minibatches": 2, "ppo_epochs": 2, "kl_estimator": "k3", "gamma": 0.9, "reward_clip": 1.0},
    {"baseline": "group", "samples_per_prompt": 2, "kl_in": "loss", "kl_estimator": "k2", "kl_coef": 0.3},
    {"kl_estimator": "k2", "kl_coef": 0.5, "normalize_std": False, "num_minibatches": 2},
])
def test_reinforce_pp_step_hands_the_optimizer_openrlhfs_loss(algo):
    method, cfg = method_for("reinforce_pp", **algo)
    engine = FakeEngine(cfg, seed=4)
    method.step(engine, PROMPTS)
    ids = sampled_rows(engine)
    n = cfg.samples_per_prompt
    assert [engine.rows[i].prompt for i in ids] == [p for p in PROMPTS for _ in range(n)]
    mask, logp, ref, _, score = engine.table(ids)
    A = openrlhf_advantages(mask, logp, ref, score, [engine.rows[i].prompt for i in ids], cfg, cfg.kl_coef)
    pos = {i: k for k, i in enumerate(ids)}
    eps = cfg.clip_range

    def loss_fn(delta, delta_v, rows):  # PolicyLoss (token mean) [+ kl_coef * token mean of KL(pi_theta, pi_ref)]
        k = [pos[i] for i in rows]
        m, old = t64(mask[k]), t64(logp[k])
        new = (old + delta[rows]) * m
        ratio = torch.exp(new - old)
        adv = t64(A[k])
        loss = -(torch.min(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv) * m).sum() / m.sum()
        if cfg.kl_in == "loss":
            d = new - t64(ref[k])
            kl = {"k1": d, "k2": d**2 / 2, "k3": torch.exp(-d) - 1 + d}[cfg.kl_estimator].clamp(-10, 10)
            loss = loss + cfg.kl_coef * (kl * m).sum() / m.sum()
        return loss

    assert replay(engine, loss_fn) == cfg.ppo_epochs * cfg.num_minibatches == method.updates_per_iteration
    for e in range(cfg.ppo_epochs):
        steps = engine.steps[e * cfg.num_minibatches : (e + 1) * cfg.num_minibatches]
        assert sorted(i for s in steps for i in s["rows"]) == ids
        assert all(len(s["rows"]) == len(ids) // cfg.num_minibatches for s in steps)  # equal minibatches


# ---------------------------------------------------------------------------------------------- online DPO and XPO
def dpo_reference(engine, a_ids, b_ids, cfg, alpha=None):
    """TRL's OnlineDPOTrainer (sigmoid: -logsigmoid(beta * (logratio_w - logratio_l)), ipo: (delta - 1/(2 beta))^2 on
    sequence log-ratios) with a tie to the first sample; XPOTrainer adds alpha * sum_t log pi(reference sample).
    ``missing_eos_penalty`` comes off the score of each sample cut off before EOS (TRL:
    ``scores[~contain_eos_token] -= missing_eos_penalty``; here: a row as long as WIDTH)."""
    ma, la, ra, _, sa = engine.table(a_ids)
    mb, lb, rb, _, sb = engine.table(b_ids)
    penalty = cfg.missing_eos_penalty or 0.0
    sa, sb = sa - penalty * (ma.sum(-1) == WIDTH), sb - penalty * (mb.sum(-1) == WIDTH)
    a_wins = torch.tensor(sa >= sb)

    def loss_fn(delta, delta_v, rows):
        assert rows == sorted(a_ids + b_ids)
        pa = ((t64(la) + delta[a_ids]) * t64(ma)).sum(-1)
        pb = ((t64(lb) + delta[b_ids]) * t64(mb)).sum(-1)
        ref_a, ref_b = t64(ra).sum(-1), t64(rb).sum(-1)
        h = torch.where(a_wins, (pa - ref_a) - (pb - ref_b), (pb - ref_b) - (pa - ref_a))
        if cfg.losses() == [("sigmoid", 1.0)]:
            per = -torch.nn.functional.logsigmoid(cfg.beta * h)
        elif cfg.losses() == [("ipo", 1.0)]:
            per = (h - 1 / (2 * cfg.beta)) ** 2
        else:
            raise AssertionError(cfg.losses())
        if alpha is not None:
            per = per + alpha * pb
        return per.mean()

    return loss_fn


@pytest.mark.parametrize("algo", [{}, {"beta": 0.5}, {"loss_type": "ipo", "beta": 0.3},
                                  {"missing_eos_penalty": 3.0}, {"missing_eos_penalty": 3.0, "beta": 0.2}])
def test_online_dpo_step_hands_the_optimizer_trls_loss(algo):
    method, cfg = method_for("online_dpo", **algo)
    engine = FakeEngine(cfg, seed=5)
    method.step(engine, PROMPTS)
    ids = sampled_rows(engine)
    a_ids, b_ids = ids[: len(PROMPTS)], ids[len(PROMPTS):]
    assert [engine.rows[i].prompt for i in a_ids] == [engine.rows[i].prompt for i in b_ids] == PROMPTS
    assert replay(engine, dpo_reference(engine, a_ids, b_ids, cfg)) == 1 == method.updates_per_iteration


@pytest.mark.parametrize("alpha,iteration", [(1e-5, 7), (0.7, 7), ([0.0, 2.0], 7), ([0.0, 2.0], 4),
                                             ([0.0, 2.0], 5), ([1.0, 0.5, 0.0], 3), ([1.0, 0.5, 0.0], 6)])
def test_xpo_step_adds_the_exploration_term_on_the_reference_sample(alpha, iteration):
    method, cfg = method_for("xpo", alpha=alpha)
    engine = FakeEngine(cfg, seed=6, iteration=iteration)
    method.step(engine, PROMPTS)
    a_ids, b_ids = sampled_rows(engine), sampled_rows(engine, from_reference=True)
    assert len(a_ids) == len(b_ids) == len(PROMPTS)
    # a schedule of k values over 10 iterations (0-based): value j on iterations [10 j / k, 10 (j + 1) / k)
    value = {7: alpha[-1], 4: alpha[0], 5: alpha[-1], 3: alpha[0], 6: alpha[1]}[iteration] \
        if isinstance(alpha, list) else alpha
    assert replay(engine, dpo_reference(engine, a_ids, b_ids, cfg, alpha=value)) == 1 == method.updates_per_iteration


def test_every_online_method_is_covered_here():
    online = {name for name, spec in registry.ALGORITHMS.items() if spec.kind == "online"}
    assert online == set(CLASSES)


# ---------------------------------------------------------------------- the real engine's positions, on tiny
def make_engine(tmp_path, recipe, *overrides):

    from aligntool import data, models
    from aligntool.online.engine import Engine
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import Run

    loaded = load_recipe(RECIPES / f"{recipe}.yaml", [f"output_dir={tmp_path}", "dataset.toy.size=8",
                                                                "algo.max_new_tokens=6", *overrides])
    run = Run(loaded, tmp_path)
    run.model_path = models.resolve("tiny")
    run.tokenizer = models.load_tokenizer(run.model_path)
    run.train_dataset, run.eval_dataset = data.load_for_recipe(loaded.recipe, loaded.spec.data)
    method = registry.get(recipe).load().method(run)
    return Engine(run, method)


def test_engine_log_probs_and_values_sit_where_a_plain_forward_puts_them(tmp_path, tiny_path):
    """PPO's rollout on tiny (a value head made non-zero): each response token's log-prob under the policy and the
    reference, and the value of the state before it (V_t reads the hidden state at the position that predicts token
    t), equal a forward of that sequence alone, with no padding."""
    engine = make_engine(tmp_path, "ppo", "algo.kl_coef=0.1")
    model = engine.accelerator.unwrap_model(engine.model)
    torch.manual_seed(0)
    with torch.no_grad():
        model.value_head.weight.normal_(0, 1.0)
        model.value_head.bias.fill_(0.3)
        for p in model.lm.parameters():  # the policy moves away from the reference
            p.add_(0.02 * torch.randn_like(p))
    ro = engine.rollout(engine.prompts[:4])
    lengths = ro.mask.sum(-1).long().tolist()
    assert len(set(lengths)) > 1 or len({len(p) for p in ro.prompts}) > 1  # padding is exercised
    P = ro.prompt_width
    for i in range(len(ro.prompts)):
        keep = ro.attention_mask[i].bool()
        keep[P + lengths[i]:] = False  # the response's own tokens, no padding
        ids = ro.input_ids[i][keep].unsqueeze(0)
        p_len = int(ro.attention_mask[i, :P].sum())
        with torch.no_grad():
            out = model.lm(input_ids=ids, output_hidden_states=True)
            ref = engine.ref(input_ids=ids).logits
        lp, lp_ref = torch.log_softmax(out.logits[0].float(), -1), torch.log_softmax(ref[0].float(), -1)
        v = model.value_head(out.hidden_states[-1][0]).squeeze(-1)
        tokens = ids[0, p_len:]
        for t, tok in enumerate(tokens.tolist()):
            assert ro.logp[i, t].item() == pytest.approx(lp[p_len - 1 + t, tok].item(), abs=1e-4), (i, t)
            assert ro.logp_ref[i, t].item() == pytest.approx(lp_ref[p_len - 1 + t, tok].item(), abs=1e-4), (i, t)
            assert ro.values[i, t].item() == pytest.approx(v[p_len - 1 + t].item(), abs=1e-4), (i, t)
        assert (ro.logp[i, lengths[i]:] == 0).all() and (ro.logp_ref[i, lengths[i]:] == 0).all()
    # the same forward with grad (the update's) gives the same log-probs and values
    logp, values = engine.policy_logprobs(ro, grad=True)
    assert torch.allclose(logp.detach(), ro.logp, atol=1e-5) and torch.allclose(values.detach(), ro.values, atol=1e-5)
