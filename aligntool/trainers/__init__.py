"""One module per algorithm: ``AlgoConfig`` (the recipe's ``algo.*`` keys) + ``build(run)`` (a ready trainer)."""
