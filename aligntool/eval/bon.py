"""`aligntool bon`: best-of-n sampling scored by a proxy reward (a reward model or an ensemble with mean / WCO / UWO),
measured with the toy gold reward, with the unbiased estimator of Coste et al. 2023 over n = 1..N:
for each prompt, N samples are drawn once; E[best of n] = sum_{i=n..N} C(i-1, n-1)/C(N, n) * score_(i) over the
samples sorted by proxy score, for the proxy and the gold score alike (aligntool.losses.online.best_of_n_unbiased).
The KL of best-of-n to the sampling policy is log n - (n-1)/n (Stiennon et al. 2020)."""

from __future__ import annotations

import math


def candidates(model: str, n_max: int, num_prompts: int, max_new_tokens: int = 48, temperature: float = 1.0,
               batch_size: int = 64, seed: int = 0) -> tuple[list[str], list[str], list[float]]:
    """``n_max`` samples for each of ``num_prompts`` held-out toy prompts: (prompts repeated, texts, gold scores),
    prompt-major (sample j of prompt i at i * n_max + j)."""
    from aligntool.eval.toy import _load_lm
    from aligntool.sampling import sample
    from aligntool.toy import world

    prompts = world.prompts("eval", num_prompts, seed=seed)
    policy, tokenizer = _load_lm(model, "--model")
    repeated = [p for p in prompts for _ in range(n_max)]
    texts, _ = sample(policy, tokenizer, repeated, max_new_tokens, temperature, batch_size, seed)
    return repeated, texts, [world.gold_reward(t) for t in texts]


def curve(proxy: list[float], gold: list[float], n_max: int) -> list[dict]:
    """Unbiased best-of-n proxy and gold scores for n = 1..n_max, averaged over prompts (prompt-major lists)."""
    from aligntool.losses.online import best_of_n_unbiased

    groups = range(len(proxy) // n_max)
    rows = []
    for n in range(1, n_max + 1):
        est = [best_of_n_unbiased(proxy[i * n_max : (i + 1) * n_max], gold[i * n_max : (i + 1) * n_max], n)
               for i in groups]
        rows.append({"n": n, "kl_bound": math.log(n) - (n - 1) / n, "proxy": sum(e[0] for e in est) / len(est),
                     "gold": sum(e[1] for e in est) / len(est)})
    return rows


def best_of_n(model: str, reward, n_max: int, num_prompts: int, max_new_tokens: int = 48, temperature: float = 1.0,
              batch_size: int = 64, seed: int = 0) -> dict:
    from aligntool import rewards

    repeated, texts, gold = candidates(model, n_max, num_prompts, max_new_tokens, temperature, batch_size, seed)
    proxy = rewards.load(reward)(repeated, texts)
    return {"model": model, "num_prompts": len(repeated) // n_max, "n_max": n_max, "reward": reward.model_dump(),
            "curve": curve(proxy, gold, n_max)}
