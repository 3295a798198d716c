"""What several methods share, apart from the list of algorithms in ``aligntool/trainers/``:

- ``pairwise.PairLossTrainer``: TRL's DPOTrainer with the loss replaced by a method's own pair loss;
- ``refcache.RefLogpsCache``: reference log-probs computed once and cached beside the run;
- ``stages``: stage files of multi-stage methods and the iteration driver of SPPO and INPO;
- ``trl_lists``: the loss types only the installed TRL knows (DPO, GRPO, KTO, CPO), and the one check against them.
"""
