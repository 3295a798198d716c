"""`aligntool bon`: best-of-n sampling scored by a proxy reward (a reward model or an ensemble with mean / WCO / UWO),
measured with the toy gold reward, with the unbiased estimator of Coste et al. 2023 over n = 1..N:
for each prompt, N samples are drawn once; E[best of n] = sum_{i=n..N} C(i-1, n-1)/C(N, n) * score_(i) over the
samples sorted by proxy score, for the proxy and the gold score alike (aligntool.losses.online.best_of_n_unbiased).
The KL of best-of-n to the sampling policy is log n - (n-1)/n (Stiennon et al. 2020)."""

from __future__ import annotations

import math


def best_of_n(model: str, reward, n_max: int, num_prompts: int, max_new_tokens: int = 48, temperature: float = 1.0,
              batch_size: int = 64, seed: int = 0) -> dict:
    from aligntool import rewards
    from aligntool.eval.toy import _load_lm
    from aligntool.losses.online import best_of_n_unbiased
    from aligntool.sampling import sample
    from aligntool.toy import world

    prompts = world.prompts("eval", num_prompts, seed=seed)
    policy, tokenizer = _load_lm(model, "--model")
    repeated = [p for p in prompts for _ in range(n_max)]
    texts, _ = sample(policy, tokenizer, repeated, max_new_tokens, temperature, batch_size, seed)
    proxy = rewards.load(reward)(repeated, texts)
    gold = [world.gold_reward(t) for t in texts]
    curve = []
    for n in range(1, n_max + 1):
        est = [best_of_n_unbiased(proxy[i * n_max : (i + 1) * n_max], gold[i * n_max : (i + 1) * n_max], n)
               for i in range(len(prompts))]
        curve.append({"n": n, "kl_bound": math.log(n) - (n - 1) / n, "proxy": sum(e[0] for e in est) / len(est),
                      "gold": sum(e[1] for e in est) / len(est)})
    return {"model": model, "num_prompts": len(prompts), "n_max": n_max, "reward": reward.model_dump(), "curve": curve}
