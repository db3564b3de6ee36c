"""The method's core: engine (the local step and its contract), partition (units into K modules),
momentum (MAN and MAN++'s auxiliary networks) and optim (the optimizer, its groups and the lr schedule).
"""
