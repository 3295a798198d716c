"""Mutation test of the suite: plant one bug at a time, run the tests of its area, record caught / survived, restore.

    python3 scripts/mutation_test.py                 # every mutation (70: about 11 minutes on 2 cores)
    python3 scripts/mutation_test.py --round 2       # only the second round's 31
    python3 scripts/mutation_test.py --only online   # one area (repeatable)
    python3 scripts/mutation_test.py --list          # the mutations, nothing run
    python3 scripts/mutation_test.py --baseline      # the "before" score: only the test files that exist on main
    python3 scripts/mutation_test.py --examples      # the surviving bugs issue 27 lists, instead of this list

Each mutation names its area, a file, an exact snippet (it must occur exactly once: a snippet that is not found, e.g.
after a refactor moved the code, stops the script with an error naming it, so the list gets repointed instead of
silently measuring nothing) and its replacement. The area's test files run with ``pytest -x -q -n 0``; a non-zero
exit is "caught". The file is always restored (try/finally, and checked byte for byte and with ``git diff --quiet``
at the end). Run it from a clean work tree: a mutation must be the only change.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The test files run for each area. Keep each fast: seconds to a minute per mutation (the slow end-to-end files,
# test_online_e2e / test_output_folders / test_mfac, take minutes each and are left out).
AREAS: dict[str, list[str]] = {
    "online": ["tests/test_online_wiring.py", "tests/test_engine_wiring.py", "tests/test_online_engine.py",
               "tests/test_losses_online.py", "tests/test_reinforce_pp.py"],
    "recipe": ["tests/test_defaults_bounds.py", "tests/test_recipe.py", "tests/test_bad_input.py",
               "tests/test_steplaw.py"],
    "resume": ["tests/test_resume_decisions.py", "tests/test_engine_wiring.py", "tests/test_resume_outputs_wiring.py",
               "tests/test_resume_rules.py"],
    "losses": ["tests/test_losses_online.py", "tests/test_losses_preference.py", "tests/test_online_wiring.py"],
    "compression": ["tests/test_quantizers.py"],
}


@dataclass(frozen=True)
class Mutation:
    area: str
    path: str
    old: str
    new: str
    what: str


M = Mutation
MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------------------------------ online wiring
    M("online", "aligntool/online/ppo.py", "adv, returns = L.gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)",
      "adv, returns = L.gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.gamma)", "PPO: GAE lambda replaced by gamma"),
    M("online", "aligntool/online/ppo.py", "pl, cf = L.ppo_policy_loss(logp, mb.logp, adv[idx]",
      "pl, cf = L.ppo_policy_loss(logp, logp.detach(), adv[idx]", "PPO: ratio against the current policy"),
    M("online", "aligntool/online/ppo.py", "vl, vcf = L.ppo_value_loss(values, mb.values, returns[idx]",
      "vl, vcf = L.ppo_value_loss(values, mb.values, adv[idx]", "PPO: value target the advantages, not the returns"),
    M("online", "aligntool/online/ppo.py", "engine.optimizer_step(pl + cfg.vf_coef * vl)",
      "engine.optimizer_step(pl + vl)", "PPO: vf_coef ignored"),
    M("online", "aligntool/online/ppo.py", "controller.update(kl, len(prompts) * engine.world)",
      "controller.update(kl, engine.world)", "PPO: adaptive KL stepped by processes, not samples"),
    M("online", "aligntool/online/p3o.py", "reward = ro.score - cfg.kl_coef * sequence_kl(ro)",
      "reward = ro.score + cfg.kl_coef * sequence_kl(ro)", "P3O: KL penalty with the wrong sign"),
    M("online", "aligntool/online/p3o.py", "for _ in range(cfg.ppo_epochs):",
      "for _ in range(max(1, cfg.ppo_epochs - 1)):", "P3O: one epoch short"),
    M("online", "aligntool/online/remax.py", "returns = remax_returns(ro.logp, ro.logp_ref,",
      "returns = remax_returns(ro.logp_ref, ro.logp,", "ReMax: KL term sign flipped (log-prob arguments swapped)"),
    M("online", "aligntool/online/reinforce_pp.py",
      "score = L.group_baseline(ro.score, n) if cfg.baseline == \"group\" else ro.score",
      "score = ro.score", "REINFORCE++: group baseline ignored"),
    M("online", "aligntool/online/reinforce_pp.py", "L.kl_estimate(logp, mb.logp_ref, cfg.kl_estimator)",
      "L.kl_estimate(mb.logp, mb.logp_ref, cfg.kl_estimator)", "REINFORCE++: KL loss on the old policy (no gradient)"),
    M("online", "aligntool/online/reinforce_pp.py", "size = rows // cfg.num_minibatches",
      "size = rows // cfg.num_minibatches + 1", "REINFORCE++: minibatches too large (steps skipped)"),
    M("online", "aligntool/online/online_dpo.py", "pick(lb, la), pick(ra, rb), pick(rb, ra)",
      "pick(lb, la), pick(rb, ra), pick(ra, rb)", "online DPO: reference log-probs of chosen / rejected swapped"),
    M("online", "aligntool/online/xpo.py", "return xpo_loss(per_pair, lp_b, b.mask, alpha)",
      "return xpo_loss(per_pair, lp_b.detach(), b.mask, alpha)", "XPO: exploration term without gradient"),
    M("online", "aligntool/online/rollout.py", "values = values[:, ro.prompt_width - 1 : -1]",
      "values = values[:, ro.prompt_width :]", "engine: values one position late"),
    M("online", "aligntool/online/rollout.py",
      "return ro.with_(logp=logp, values=values, logp_ref=self.ref_logprobs(ro))",
      "return ro.with_(logp=logp, values=values, logp_ref=logp)", "engine: rollout's reference log-probs the policy's"),
    # ------------------------------------------------------------------------------ recipe defaults and bounds
    M("recipe", "aligntool/online/ppo.py", "clip_range_value: float = Field(0.2, gt=0",
      "clip_range_value: float = Field(0.3, gt=0", "PPO default clip_range_value 0.3"),
    M("recipe", "aligntool/online/reinforce_pp.py", "kl_coef: float = Field(0.01, ge=0",
      "kl_coef: float = Field(0.1, ge=0", "REINFORCE++ default kl_coef 0.1"),
    M("recipe", "aligntool/trainers/dpo.py", "beta: float = Field(0.1, gt=0, description=\"KL strength",
      "beta: float = Field(0.05, gt=0, description=\"KL strength", "DPO default beta 0.05"),
    M("recipe", "aligntool/online/remax.py", "gamma: float = Field(0.99, gt=0, le=1,",
      "gamma: float = Field(0.99, gt=0, le=2,", "ReMax gamma bound le=2"),
    M("recipe", "aligntool/online/online_dpo.py", "label_smoothing: float = Field(0.0, ge=0, lt=0.5,",
      "label_smoothing: float = Field(0.0, ge=0, le=0.5,", "online DPO label_smoothing 0.5 accepted"),
    M("recipe", "aligntool/recipe/base.py", "\"top_p\": (float, Field(top_p, gt=0, le=1,",
      "\"top_p\": (float, Field(top_p, gt=0,", "sampling top_p > 1 accepted"),
    M("recipe", "aligntool/recipe/dataset.py", "0.0, ge=0, lt=1, description=\"Without an eval set",
      "0.0, ge=0, le=1, description=\"Without an eval set", "eval_fraction 1 accepted"),
    M("recipe", "aligntool/online/reinforce_pp.py",
      "if self.baseline == \"group\" and self.samples_per_prompt < 2:",
      "if self.baseline == \"group\" and self.samples_per_prompt < 1:", "REINFORCE++ group with 1 sample accepted"),
    M("recipe", "aligntool/online/xpo.py", "if not values or any(a < 0 for a in values):",
      "if not values or any(a < -1 for a in values):", "XPO negative alpha accepted"),
    M("recipe", "aligntool/data/__init__.py", "train = train.select(range(cfg.max_samples))",
      "train = train.select(range(len(train) - cfg.max_samples, len(train)))", "max_samples keeps the last N rows"),
    M("recipe", "aligntool/recipe/schema.py",
      "if abs(sum(self.soup_weights) - 1) > 1e-6 or min(self.soup_weights) < 0:",
      "if abs(sum(self.soup_weights) - 1) > 1e-6:", "negative soup weights accepted"),
    # ---------------------------------------------------------------------------------------- resume / outputs
    M("resume", "aligntool/online/checkpoint.py", "        self.optimizer.load_state_dict(state[\"optimizer\"])\n",
      "", "online resume: optimizer state not restored"),
    M("resume", "aligntool/online/checkpoint.py",
      "if model.value_head is not None and (path / \"value_head.safetensors\").is_file():",
      "if False and (path / \"value_head.safetensors\").is_file():", "online resume: value head not restored"),
    M("resume", "aligntool/online/engine.py", "        self.scheduler.step()\n        self.optimizer.zero_grad",
      "        self.optimizer.zero_grad", "online: scheduler never stepped"),
    M("resume", "aligntool/train_callbacks.py", "if model is not None and not _finite_weights(model):",
      "if False:", "TRL checkpoint with non-finite weights marked complete"),
    M("resume", "aligntool/online/checkpoint.py",
      "if not sharded and not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):",
      "if False:", "online checkpoint with non-finite weights marked complete"),
    M("resume", "aligntool/outputs.py", "return sorted(found, key=checkpoint_step, reverse=True)",
      "return sorted(found, key=checkpoint_step)", "the oldest complete checkpoint taken as the latest"),
    # --------------------------------------------------------------------------------------------------- losses
    M("losses", "aligntool/losses/online.py", "last = (delta + gamma * lam * last) * mask[..., t]",
      "last = (delta + lam * last) * mask[..., t]", "GAE without gamma in the recursion"),
    M("losses", "aligntool/losses/online.py", "kl = (-d).exp() - 1 + d", "kl = d.exp() - 1 - d",
      "k3 estimator of the reverse direction"),
    M("losses", "aligntool/losses/online.py", "var = total((((x - mean) ** 2) * mask).sum()) / count",
      "var = total((((x - mean) ** 2) * mask).sum()) / (count - 1)", "whitening with the unbiased variance"),
    M("losses", "aligntool/losses/preference.py", "return (margin - 1 / (2 * beta)) ** 2",
      "return (margin - 1 / beta) ** 2", "IPO target 1/beta"),
    # ---------------------------------------------------------------------------------------------- compression
    M("compression", "aligntool/compress/quantizers.py",
      "codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]).clamp_(0, levels)",
      "codes = torch.floor((groups - zero.float()[..., None]) / scale.float()[..., None]).clamp_(0, levels)",
      "RTN rounds down"),
    M("compression", "aligntool/compress/quantizers.py", "    levels = 2**bits - 1\n    zero = lo.half()",
      "    levels = 2**bits - 2\n    zero = lo.half()", "RTN uses one level too few"),
    M("compression", "aligntool/compress/quantizers.py", "        packed |= stream[:, j] << j\n",
      "        packed |= stream[:, j] << (7 - j)\n", "bit packing in the reverse bit order"),
    # (the second round's mutations follow: ROUND2)
]

# The second round (issue 27 item 8 again): bugs the first round's tests were blind to (``--round 2`` runs only these).
ROUND2: list[Mutation] = [
    # online engine internals
    M("online", "aligntool/online/rollout.py",
      "score = score - self.cfg.missing_eos_penalty * ro.missing_eos.to(score.dtype)",
      "score = score + self.cfg.missing_eos_penalty * ro.missing_eos.to(score.dtype)",
      "engine: missing_eos_penalty added to the score"),
    M("online", "aligntool/online/rollout.py",
      "return self.samples([p for p in prompts for _ in range(n)], [\"sample\"])[0]",
      "return self.samples([p for _ in range(n) for p in prompts], [\"sample\"])[0]",
      "engine: sample_groups rows not grouped per prompt"),
    M("online", "aligntool/losses/online.py", "return (n / world).clamp(min=1)", "return n.clamp(min=1)",
      "token_denominator ignores the number of processes"),
    M("online", "aligntool/online/engine.py", "torch.tensor(float(t.numel()), device=t.device)",
      "torch.tensor(float(t.numel() - 1), device=t.device)", "engine: global_mean divides by n - 1"),
    M("online", "aligntool/online/engine.py", "clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)",
      "clip_grad_norm_(self.model.parameters(), float(\"inf\"))", "engine: max_grad_norm ignored (no clipping)"),
    M("online", "aligntool/online/engine.py", "        self.optimizer.zero_grad(set_to_none=True)\n", "",
      "engine: gradients never zeroed (they accumulate across updates)"),
    M("online", "aligntool/online/engine.py",
      "rng = random.Random(self.args.seed * SEED_STRIDE + self.state[\"iteration\"])",
      "rng = random.Random(self.args.seed * SEED_STRIDE)", "engine: the same prompt draw every iteration"),
    M("online", "aligntool/online/engine.py",
      "return drawn[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]",
      "return drawn[self.rank : self.rank + self.batch_size]", "engine: processes' prompt slices overlap"),
    M("online", "aligntool/online/setup.py", "num_warmup_steps=args.get_warmup_steps(updates)",
      "num_warmup_steps=0", "engine: LR warm-up dropped"),
    M("online", "aligntool/online/setup.py", "updates = self.iterations * self.method.updates_per_iteration",
      "updates = self.iterations", "engine: LR schedule over iterations, not optimizer steps"),
    M("online", "aligntool/online/setup.py", "weight_decay=args.weight_decay, **optim_kwargs",
      "weight_decay=0.0, **optim_kwargs", "engine: train.weight_decay ignored"),
    # online methods, other lines
    M("online", "aligntool/losses/online.py", "error = max(-0.2, min(0.2, kl / self.target - 1))",
      "error = max(-0.2, min(2.0, kl / self.target - 1))", "adaptive KL: upper clip of the error 2 instead of 0.2"),
    M("online", "aligntool/losses/online.py",
      "j2 = torch.min(rho2 * -adv, torch.clamp(rho2, 1 - clip, 1 + clip) * -adv)", "j2 = rho2 * -adv",
      "P3O V1: second response's ratio not clipped"),
    M("online", "aligntool/online/online_dpo.py",
      "pa, pb = ([penalty * float(m) for m in ro.missing_eos.tolist()] for ro in (a, b))",
      "pa, pb = ([penalty * float(m) for m in ro.missing_eos.tolist()] for ro in (b, a))",
      "online DPO: missing-EOS penalty charged to the other sample"),
    M("online", "aligntool/online/xpo.py",
      "part = engine.state[\"iteration\"] * len(alpha) // max(1, engine.iterations)",
      "part = (engine.state[\"iteration\"] + 1) * len(alpha) // max(1, engine.iterations)",
      "XPO: alpha schedule one iteration early"),
    M("online", "aligntool/losses/online.py", "        dr = dr.clamp(-clip, clip)\n",
      "        dr = dr.clamp(max=clip)\n", "ReMax: reward_clip only from above"),
    M("online", "aligntool/losses/online.py", "discount = gamma ** (T - pos).clamp(min=0)",
      "discount = gamma ** (T - pos - 1).clamp(min=0)", "ReMax: discount one power short"),
    # recipe bounds, defaults, validators, overrides, Step Law
    M("recipe", "aligntool/online/p3o.py", "clip_range: float = Field(0.2, gt=0, description=\"epsilon of the clipped",
      "clip_range: float = Field(0.2, description=\"epsilon of the clipped", "P3O clip_range bound gt=0 removed"),
    M("recipe", "aligntool/online/ppo.py", "lam: float = Field(0.95, ge=0, le=1,",
      "lam: float = Field(0.95, ge=0, le=1.5,", "PPO lam bound le=1.5"),
    M("recipe", "aligntool/online/reinforce_pp.py", "if self.baseline == \"group\" and self.gamma != 1:",
      "if self.baseline == \"group\" and self.gamma > 1:", "REINFORCE++ group with gamma < 1 accepted"),
    M("recipe", "aligntool/recipe/base.py",
      "def Sampling(temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 48,",
      "def Sampling(temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 64,",
      "sampling default max_new_tokens 64"),
    M("recipe", "aligntool/recipe/base.py", "None, ge=0, description=\"Subtracted from the score",
      "None, description=\"Subtracted from the score", "negative missing_eos_penalty accepted"),
    M("recipe", "aligntool/recipe/loader.py", "value = safe_load(raw) if raw.strip() else None",
      "value = raw if raw.strip() else None", "overrides not parsed as YAML (numbers stay strings)"),
    M("recipe", "aligntool/recipe/steplaw.py", "return math.exp((math.log(steps) + log_c) / (1 - b))",
      "return math.exp((math.log(steps) + log_c) / (1 + b))", "Step Law tokens_for_steps exponent"),
    # resume / outputs
    M("resume", "aligntool/resume.py", "extends = any(key in (\"train.max_steps\", \"train.num_train_epochs\")",
      "extends = any(key in (\"train.max_steps\",)", "finished run: more epochs accepted but nothing trained"),
    M("resume", "aligntool/resume.py", "if after == \"auto\" and key in old_auto:", "if after == \"auto\":",
      "resume: an explicit value switched to auto is not a change"),
    M("resume", "aligntool/resume.py", "    for flat in (a, b):  # the folder itself",
      "    for flat in (a,):  # the folder itself", "resume: a moved run folder counts as a changed recipe"),
    M("resume", "aligntool/outputs.py", "            elif file.suffix == \".json\":\n",
      "            elif file.suffix == \".jsonl\":\n", "a checkpoint with an unreadable state.json is resumed from"),
    M("resume", "aligntool/outputs.py", "        if problem is None:\n            return ckpt\n",
      "        return ckpt\n", "latest_checkpoint does not skip a truncated checkpoint"),
    M("resume", "aligntool/online/checkpoint.py",
      "for old in complete_checkpoints(self._checkpoint_dir())[limit:]:",
      "for old in complete_checkpoints(self._checkpoint_dir())[limit + 1:]:",
      "online: save_total_limit keeps one checkpoint too many"),
    M("resume", "aligntool/online/checkpoint.py", "        torch.set_rng_state(state[\"rng\"])\n", "",
      "online resume: torch RNG state not restored"),
]
ROUND1 = list(MUTATIONS)
MUTATIONS += ROUND2


# The surviving bugs that issue 27 lists (a mutation test before these tests were written), for ``--examples``.
EXAMPLES: list[Mutation] = [
    M("online", "aligntool/online/ppo.py", "L.kl_penalised_rewards(ro.score, ro.logp, ro.logp_ref, ro.mask, kl_coef)",
      "L.kl_penalised_rewards(ro.score, ro.logp, ro.logp_ref, ro.mask, 0.0)", "PPO: KL penalty dropped"),
    M("online", "aligntool/online/ppo.py", "if cfg.whiten_advantages:\n            adv = L.whiten(",
      "if False:\n            adv = L.whiten(", "PPO: advantages not whitened"),
    M("online", "aligntool/online/ppo.py", "for idx in minibatches(len(prompts), size, gen):",
      "for idx in list(minibatches(len(prompts), size, gen))[: max(1, cfg.num_minibatches - 1)]:",
      "PPO: the last minibatch's step skipped"),
    M("online", "aligntool/losses/online.py", "dr = reward - reward_greedy", "dr = reward_greedy - reward",
      "ReMax: advantage sign flipped"),
    M("online", "aligntool/online/reinforce_pp.py", "L.kl_estimate(ro.logp, ro.logp_ref, cfg.kl_estimator)",
      "L.kl_estimate(ro.logp_ref, ro.logp, cfg.kl_estimator)", "REINFORCE++: KL estimate arguments swapped"),
    M("online", "aligntool/online/rollout.py", "values = values[:, ro.prompt_width - 1 : -1]",
      "values = values[:, ro.prompt_width :]", "PPO: value positions shifted by one"),
    M("resume", "aligntool/online/checkpoint.py", "        self.scheduler.load_state_dict(state[\"scheduler\"])\n", "",
      "online resume: scheduler state not restored"),
    M("recipe", "aligntool/data/__init__.py", "train = train.select(range(cfg.max_samples))",
      "train = train.select(range(cfg.max_samples - 1))", "max_samples keeps N-1 rows"),
    M("recipe", "aligntool/trainers/dpo.py", "beta: float = Field(0.1, gt=0, description=\"KL strength",
      "beta: float = Field(0.2, gt=0, description=\"KL strength", "DPO default beta changed"),
    M("recipe", "aligntool/online/ppo.py", "lam: float = Field(0.95, ge=0, le=1",
      "lam: float = Field(0.9, ge=0, le=1", "PPO default lam changed"),
    M("recipe", "aligntool/trainers/dpo.py", "0.0, ge=0, lt=0.5, description=\"Label flip",
      "0.0, ge=0, le=0.5, description=\"Label flip", "DPO label_smoothing 0.5 accepted"),
    M("recipe", "aligntool/recipe/schema.py",
      "if abs(sum(self.soup_weights) - 1) > 1e-6 or min(self.soup_weights) < 0:",
      "if abs(sum(self.soup_weights) - 1) > 1e-6:", "negative soup weights accepted"),
    M("resume", "aligntool/train_callbacks.py", "if model is not None and not _finite_weights(model):",
      "if False:", "TRL checkpoint with non-finite weights marked complete"),
]

def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def tests_for(area: str, baseline_ref: str | None) -> list[str]:
    files = AREAS[area]
    if baseline_ref:
        files = [f for f in files if git("cat-file", "-e", f"{baseline_ref}:{f}").returncode == 0]
    return files


def run_tests(files: list[str], timeout: int) -> tuple[str, float, str]:
    """('caught' | 'survived' | 'timeout' | 'no tests', seconds, last line)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *files]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - start, ""
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else proc.stderr.strip()[-200:]
    verdict = {0: "survived", 5: "no tests"}.get(proc.returncode, "caught")
    return verdict, time.time() - start, last


def check_snippets(mutations: list[Mutation]) -> None:
    bad = []
    for m in mutations:
        path = REPO / m.path
        count = path.read_text().count(m.old) if path.is_file() else -1
        if count != 1:
            bad.append(f"  {m.path}: {'file not found' if count < 0 else f'snippet found {count} times'} "
                       f"({m.what}): {m.old[:70]!r}")
    if bad:
        sys.exit("mutation_test: these snippets must occur exactly once (repoint them):\n" + "\n".join(bad))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=sorted(AREAS), help="run only this area (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--round", type=int, choices=(1, 2), help="only the first round's mutations, or the second's")
    ap.add_argument("--examples", action="store_true", help="run the surviving bugs issue 27 lists instead")
    ap.add_argument("--baseline", nargs="?", const="main", default=None, metavar="REF",
                    help="run only the area test files that exist in REF (default main): the score before")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutation's test run")
    ap.add_argument("--no-sanity", dest="sanity", action="store_false",
                    help="skip the first run of each area's tests unmutated (they must pass: a suite that already "
                         "fails would count every mutation as caught)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    pool = EXAMPLES if args.examples else {1: ROUND1, 2: ROUND2}.get(args.round, MUTATIONS)
    mutations = [m for m in pool if not args.only or m.area in args.only]
    if args.list:
        for i, m in enumerate(mutations, 1):
            print(f"{i:2d}. [{m.area}] {m.path}: {m.what}")
        print(f"{len(mutations)} mutations; areas: " + ", ".join(f"{a} ({' '.join(f)})" for a, f in AREAS.items()))
        return 0
    check_snippets(mutations)
    touched = sorted({m.path for m in mutations})
    dirty = [p for p in touched if git("diff", "--quiet", "--", p).returncode != 0]
    if dirty:
        sys.exit(f"mutation_test: uncommitted changes in {', '.join(dirty)}; commit them first")

    if args.sanity:
        for area in sorted({m.area for m in mutations}):
            verdict, secs, last = run_tests(tests_for(area, args.baseline), args.timeout)
            print(f"sanity [{area}] {verdict} in {secs:.0f}s: {last}", flush=True)
            if verdict != "survived":
                sys.exit(f"mutation_test: the {area} tests fail without any mutation")

    results, start = [], time.time()
    for i, m in enumerate(mutations, 1):
        path = REPO / m.path
        original = path.read_bytes()
        files = tests_for(m.area, args.baseline)
        try:
            path.write_text(original.decode().replace(m.old, m.new, 1))
            verdict, secs, last = run_tests(files, args.timeout) if files else ("no tests", 0.0, "")
        finally:
            path.write_bytes(original)
        results.append({"area": m.area, "path": m.path, "what": m.what, "verdict": verdict, "seconds": round(secs, 1),
                        "last": last})
        print(f"{i:2d}/{len(mutations)} [{m.area}] {verdict:8s} {secs:5.0f}s  {m.path}: {m.what}", flush=True)

    for p in touched:
        if git("diff", "--quiet", "--", p).returncode != 0:
            sys.exit(f"mutation_test: {p} was not restored (git diff shows changes)")
    print(f"\nscore{' (baseline: test files of ' + args.baseline + ')' if args.baseline else ''}, "
          f"{time.time() - start:.0f}s:")
    for area in AREAS:
        rows = [r for r in results if r["area"] == area]
        if rows:
            caught = sum(r["verdict"] in ("caught", "timeout") for r in rows)
            survived = [r["what"] for r in rows if r["verdict"] not in ("caught", "timeout")]
            print(f"  {area:12s} {caught}/{len(rows)} caught" + (f"; survived: {'; '.join(survived)}"
                                                                   if survived else ""))
    total = sum(r["verdict"] in ("caught", "timeout") for r in results)
    print(f"  {'total':12s} {total}/{len(results)} caught")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
