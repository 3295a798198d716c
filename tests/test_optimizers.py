"""aligntool's own optimizers (aligntool/optim): Lion-kappa (Chen et al., ICLR 2024) and COSMOS (Liu et al. 2025).

Reference numbers are computed here, independently: NumPy re-implementations of the published update rules, the
constrained optimum of a separable quadratic by clipping / projection, singular values by torch.linalg.svd."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import RECIPES, REPO

from aligntool.cli import main
from aligntool.errors import UserError
from aligntool.optim import Cosmos, LionKappa
from aligntool.optim.cosmos import newton_schulz
from aligntool.recipe.loader import load_recipe
from aligntool.train import train


@pytest.fixture(autouse=True)
def one_thread():
    """These small matrix products take microseconds on one thread and tens of milliseconds each on a loaded machine
    with torch's default thread pool (spinning OpenMP barriers): one thread, as in the parallel suite's workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------- Lion-kappa
def run_quadratic(kappa, a, c, x0, lam, steps=2000, lr0=2e-2, lr1=2e-4):
    """Lion-kappa on f(x) = 1/2 sum a_i (x_i - c_i)^2, lr decaying geometrically from lr0 to lr1; the iterates."""
    x = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = LionKappa([x], lr=lr0, betas=(0.9, 0.99), weight_decay=lam, kappa=kappa)
    a, c = torch.tensor(a, dtype=torch.float64), torch.tensor(c, dtype=torch.float64)
    trace = []
    for t in range(steps):
        opt.param_groups[0]["lr"] = lr0 * (lr1 / lr0) ** (t / (steps - 1))
        x.grad = a * (x.detach() - c)
        opt.step()
        trace.append(x.detach().clone().numpy())
    return np.array(trace)


def test_lion_l1_settles_in_the_box_at_the_clipped_optimum():
    # the paper's claim: Lion with decoupled weight decay lambda solves min f s.t. ||x||_inf <= 1/lambda
    lam = 2.0  # box [-0.5, 0.5]
    a = [1.0, 3.0, 0.5, 2.0, 1.5]
    c = [2.0, -1.5, 0.2, -0.3, 0.9]  # unconstrained minimiser, three coordinates outside the box
    x0 = [1.5, 1.2, -1.0, 0.0, 0.1]  # and the start outside too
    trace = run_quadratic("l1", a, c, x0, lam)
    settled = trace[len(trace) // 2:]
    assert np.abs(settled).max() <= 1 / lam + 2e-2  # inside the box (up to the step size) for the second half
    assert np.abs(trace[0]).max() > 1 / lam  # it did start outside
    expected = np.clip(c, -1 / lam, 1 / lam)  # the constrained optimum of a separable quadratic: clipping
    np.testing.assert_allclose(trace[-1], expected, atol=3e-3)
    # with no weight decay the same run goes to the unconstrained minimiser instead
    free = run_quadratic("l1", a, c, x0, 0.0)
    np.testing.assert_allclose(free[-1], c, atol=3e-3)


def test_lion_l2_settles_in_the_ball_at_the_projected_optimum():
    # kappa = ||.||_2: min f s.t. ||x||_2 <= 1/lambda; for f = 1/2 ||x - c||^2 the optimum is c projected on the ball
    lam = 1.0
    c = np.array([1.2, -0.8, 0.5, 2.0])
    trace = run_quadratic("l2", [1.0] * 4, c, [0.0, 0.3, -2.0, 0.5], lam)
    norms = np.linalg.norm(trace, axis=1)
    assert norms[len(trace) // 2:].max() <= 1 / lam + 2e-2
    np.testing.assert_allclose(trace[-1], c / np.linalg.norm(c) / lam, atol=3e-3)


def lion_numpy(x, grads, lr, b1, b2, wd, kappa):
    m = np.zeros_like(x)
    for g in grads:
        u = b1 * m + (1 - b1) * g
        d = np.sign(u) if kappa == "l1" else u / np.sqrt((u * u).sum())
        x = x - lr * (d + wd * x)
        m = b2 * m + (1 - b2) * g
    return x


@pytest.mark.parametrize("kappa", ["l1", "l2"])
def test_lion_steps_match_numpy(kappa):
    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(3, 4))
    grads = [rng.normal(size=(3, 4)) for _ in range(3)]
    p = torch.nn.Parameter(torch.tensor(x0))
    opt = LionKappa([p], lr=0.05, betas=(0.8, 0.95), weight_decay=0.3, kappa=kappa)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), lion_numpy(x0, grads, 0.05, 0.8, 0.95, 0.3, kappa), rtol=1e-12)


def test_lion_l1_equals_bitsandbytes_lion():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(64, 32))
    theirs = torch.nn.Parameter(ours.detach().clone())
    a = LionKappa([ours], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    b = bnb.optim.Lion([theirs], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, optim_bits=32)
    for _ in range(3):
        g = torch.randn(64, 32)
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-6)


def test_unknown_kappa_is_refused():
    with pytest.raises(ValueError, match="unknown kappa 'l3'"):
        LionKappa([torch.nn.Parameter(torch.zeros(2))], lr=0.1, kappa="l3")


# --------------------------------------------------------------------------------------------------- COSMOS
def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for shape in ((48, 96), (96, 48)):
        g = torch.randn(*shape, dtype=torch.float64)
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        for bf16, tol in ((False, 1e-6), (True, 3e-2)):
            o = newton_schulz(g, steps=5, bf16=bf16).double()
            core = u.T @ o @ vh.T  # in g's singular bases the result is (nearly) diagonal ...
            diag = torch.diagonal(core)
            assert (core - torch.diag(diag)).abs().max() < tol + 1e-2 * bf16
            assert diag.min() > 0.6 and diag.max() < 1.25, diag  # ... with the singular values pushed near 1
            assert (torch.linalg.svdvals(o) - 1).abs().mean() < 0.2
        assert s.max() / s.min() > 3  # a matrix that was not near-orthogonal to begin with
    assert newton_schulz(torch.zeros(4, 6), bf16=False).abs().max() == 0


def ns_numpy(x, steps):
    a, b, c = 3.4445, -4.7750, 2.0315
    x = x / (np.linalg.norm(x) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        A = x @ x.T
        x = a * x + b * A @ x + c * A @ A @ x
    return x.T if tall else x


def cosmos_numpy(w, grads, lr, b1, b2, eps, wd, r, gamma, ratio):
    """The authors' COSMOS update of one m x n matrix (github.com/lliu606/COSMOS), written from its equations."""
    m, n = w.shape
    M = np.zeros_like(w)
    V = np.zeros((m, r))
    for t, G in enumerate(grads, start=1):
        M = b1 * M + G
        if t == 1:
            evals, evecs = np.linalg.eigh(G.T @ G)
            P = evecs[:, np.argsort(evals)[::-1][:r]]
            S = (1 - b2) * (G @ P).T @ (G @ P)
        else:
            Pn = np.linalg.qr(b2 * P @ S + (1 - b2) * G.T @ G @ P)[0]
            T = P.T @ Pn
            S = b2 * T.T @ S @ T + (1 - b2) * (G @ Pn).T @ (G @ Pn)
            P = Pn
        V = b2 * V + (1 - b2) * (G @ P) ** 2
        c1 = sum(b1 ** i for i in range(t))
        Gt = (G + b1 * M) / (1 + b1 * c1)
        A = (Gt @ P / (np.sqrt(V / (1 - b2 ** t)) + eps)) @ P.T
        B = ns_numpy(Gt - Gt @ P @ P.T, 5)
        B = np.sqrt(m * n) * B / (np.linalg.norm(B) + eps)
        D = A + gamma * B
        w = (1 - lr * wd) * w - lr * ratio * np.sqrt(m * n) * D / (np.linalg.norm(D) + eps)
    return w


def adamw_numpy(w, grads, lr, b1, b2, eps, wd):
    m = v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = (1 - lr * wd) * w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return w


def test_cosmos_steps_match_numpy():
    rng = np.random.default_rng(1)
    w0, b0, e0 = rng.normal(size=(10, 7)), rng.normal(size=7), rng.normal(size=(50, 7))  # hidden, 1-D, embedding
    grads = [(rng.normal(size=(10, 7)), rng.normal(size=7), rng.normal(size=(50, 7))) for _ in range(4)]
    params = [torch.nn.Parameter(torch.tensor(x)) for x in (w0, b0, e0)]
    hp = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = Cosmos(params, rank=3, gamma=0.2, lr_ratio=0.5, ns_bf16=False, vocab_size=50, **hp)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        opt.step()
    assert opt.state[params[0]]["basis"].shape == (7, 3)  # the hidden matrix got COSMOS, the others Adam
    assert "basis" not in opt.state[params[1]] and "basis" not in opt.state[params[2]]
    np.testing.assert_allclose(params[0].detach().numpy(), cosmos_numpy(
        w0, [g[0] for g in grads], 0.01, 0.9, 0.95, 1e-8, 0.1, 3, 0.2, 0.5), rtol=1e-9, atol=1e-10)
    for i, x0 in ((1, b0), (2, e0)):
        np.testing.assert_allclose(params[i].detach().numpy(), adamw_numpy(
            x0, [g[i] for g in grads], 0.01, 0.9, 0.95, 1e-8, 0.1), rtol=1e-10)
    assert np.abs(params[0].detach().numpy() - w0).max() > 1e-3  # it moved


def test_cosmos_on_bf16_weights_steps_as_in_float32():
    """torch has no bfloat16 SVD / QR: COSMOS computes in float32 and casts the update to the weights' dtype, so a
    bf16 model takes the float32 step rounded to bf16 (hub checkpoints are mostly bf16)."""
    torch.manual_seed(0)
    w32 = torch.randn(16, 12)
    grads = [torch.randn(16, 12) for _ in range(3)]
    p16 = torch.nn.Parameter(w32.to(torch.bfloat16))
    p32 = torch.nn.Parameter(p16.detach().float().clone())
    opt16, opt32 = Cosmos([p16], lr=1e-2, rank=4), Cosmos([p32], lr=1e-2, rank=4)
    for g in grads:
        p16.grad, p32.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        before16, before32 = p16.detach().clone(), p32.detach().clone()
        opt16.step()
        opt32.step()
        assert p16.dtype == torch.bfloat16 and opt16.state[p16]["basis"].dtype == torch.float32
        step16, step32 = (p16.detach().float() - before16.float()), (p32.detach() - before32)
        # the same step, up to bf16 rounding of the weights it lands on
        assert torch.allclose(step16, step32, atol=2 * before16.float().abs().max().item() * 2**-8)
        p32.data.copy_(p16.detach().float())  # continue both from the same bf16 weights


def test_cosmos_solves_least_squares():
    torch.manual_seed(0)
    X = torch.randn(256, 24)
    W_true = torch.randn(16, 24)
    Y = X @ W_true.T
    W = torch.nn.Parameter(torch.zeros(16, 24))
    opt = Cosmos([W], lr=0.1, rank=4, lr_ratio=1.0)
    steps = 300
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + np.cos(np.pi * t / steps)) + 1e-3)
    start = ((X @ W.T - Y) ** 2).mean().item()
    for _ in range(steps):
        opt.zero_grad()
        loss = ((X @ W.T - Y) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
    final = ((X @ W.T - Y) ** 2).mean().item()
    assert final < 1e-3 * start, (start, final)


def test_cosmos_rank_larger_than_a_matrix_is_refused():
    with pytest.raises(ValueError, match=r"rank 8 is larger than the smaller dimension of a \[6, 20\] matrix"):
        Cosmos([torch.nn.Parameter(torch.zeros(6, 20))], rank=8)
    Cosmos([torch.nn.Parameter(torch.zeros(1, 20)), torch.nn.Parameter(torch.zeros(6))], rank=8)  # vectors: Adam


@pytest.mark.parametrize("make", [
    lambda ps: LionKappa(ps, lr=0.01, weight_decay=0.1, kappa="l2"),
    lambda ps: Cosmos(ps, lr=0.01, rank=2, ns_bf16=False),
])
def test_state_dict_round_trip(make, tmp_path):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]
    opt = make(ps)
    grads = [[torch.randn_like(p) for p in ps] for _ in range(4)]
    for gs in grads[:2]:
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    copies = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    resumed = make(copies)
    resumed.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for gs in grads[2:]:
        for o, pp in ((opt, ps), (resumed, copies)):
            for p, g in zip(pp, gs):
                p.grad = g.clone()
            o.step()
    for p, q in zip(ps, copies):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------------------------------- end to end
FAST = ["train.max_steps=3", "train.per_device_train_batch_size=4", "train.logging_steps=1", "train.save_steps=2",
        "train.max_length=48", "dataset.toy.size=32", "dataset.toy.eval_size=0", "train.eval_strategy=no"]


@pytest.mark.slow
@pytest.mark.parametrize("optim,extra", [("cosmos", ["optimizer.rank=8"]), ("lion_kappa", ["optimizer.kappa=l2"])])
def test_sft_trains_with_our_optimizer_and_resumes(tmp_path, tiny_path, optim, extra):
    from safetensors.torch import load_file

    args = [*FAST, f"output_dir={tmp_path}", f"train.optim={optim}", "train.learning_rate=1e-3", *extra]
    summary = train(load_recipe("sft", args))
    assert summary["global_step"] == 3
    state = torch.load(tmp_path / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    kind = "basis" if optim == "cosmos" else "exp_avg"
    assert any(kind in s for s in state["state"].values())  # it is our optimizer's state the Trainer saved
    if optim == "cosmos":
        assert state["param_groups"][0]["rank"] == 8 and state["param_groups"][0]["vocab_size"] == 640
    else:
        assert state["param_groups"][0]["kappa"] == "l2"
    moved = load_file(tmp_path / "model.safetensors")
    base = load_file(tiny_path / "model.safetensors")
    assert any(not moved[k].equal(base[k]) for k in base)
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in logs if "loss" in r)
    summary = train(load_recipe("sft", [*args, "train.max_steps=5"]), resume=True, accept_changes=True)
    # the Trainer loaded our optimizer's state from the last checkpoint and went on
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["global_step"] == 5


@pytest.mark.slow
def test_online_ppo_trains_with_cosmos_and_resumes(tmp_path, tiny_path):
    # the online engine builds our optimizer too; PPO's value head (a 1 x hidden matrix) goes to the Adam rule
    args = ["train.max_steps=2", "train.per_device_train_batch_size=4", "train.logging_steps=1", "train.save_steps=2",
            "algo.max_new_tokens=8", "dataset.toy.size=16", f"output_dir={tmp_path}", "train.optim=cosmos",
            "optimizer.rank=8"]
    assert train(load_recipe(RECIPES / "ppo.yaml", args))["global_step"] == 2
    state = torch.load(tmp_path / "checkpoints" / "checkpoint-2" / "optimizer.pt", weights_only=True)["optimizer"]
    kinds = [("basis" in s, tuple(s["exp_avg"].shape)) for s in state["state"].values()]
    assert (True, (128, 128)) in kinds and (False, (1, 128)) in kinds
    assert train(load_recipe(RECIPES / "ppo.yaml", [*args, "train.max_steps=3"]), resume=True,
                 accept_changes=True)["global_step"] == 3


def expect_error(capsys, args, *needles):
    code = main(["train", *args])
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert code == 2 and "Traceback" not in err, err
    for needle in needles:
        assert needle in last, (needle, last)


def test_bad_optimizer_inputs_end_in_one_line(capsys, tmp_path, tiny_path):
    base = ["--recipe", "sft", f"output_dir={tmp_path}"]
    expect_error(capsys, [*base, "train.optim=cosmos", "optimizer.kappa=l3"], "optimizer.kappa", "'l1'", "'l2'")
    expect_error(capsys, [*base, "optimizer.rank=8"], "optimizer", "train.optim: lion_kappa or cosmos")
    expect_error(capsys, [*base, *FAST, "train.optim=cosmos", "optimizer.rank=200"], "optimizer.rank: 200",
                 "model.layers.0.self_attn.q_proj.weight [128, 128]")


def test_sharded_backends_are_refused():
    from transformers import TrainingArguments

    from aligntool.optim import optimizer_cls_and_kwargs

    args = TrainingArguments(output_dir="unused", learning_rate=1e-3, report_to=[])
    for backend in ("deepspeed", "fsdp"):
        recipe = load_recipe("sft", ["train.optim=lion_kappa", f"distributed.backend={backend}"]).recipe
        with pytest.raises(UserError, match="train.optim: lion_kappa runs with distributed.backend ddp only"):
            optimizer_cls_and_kwargs(recipe, args, where="r.yaml")
    assert optimizer_cls_and_kwargs(load_recipe("sft", ["train.optim=adamw_torch"]).recipe, args) is None


def test_unknown_optim_name_lists_ours():
    from aligntool.recipe.schema import TrainConfig

    with pytest.raises(ValueError, match="lion_kappa, cosmos"):
        TrainConfig(optim="lion_kapa")
    assert TrainConfig(optim="cosmos").optim == "cosmos"


def test_bench_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_optimizers.py"), "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    for name in ("AdamW", "Lion", "COSMOS"):
        assert any(line.split()[:1] == [name] for line in lines), proc.stdout
