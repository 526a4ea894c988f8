"""The training run: phases in order, the Trainer and its collaborators, start-up checks, the command line
(`train.py` calls `internlm.train.cli.main`).

Nothing is imported here: ``import internlm.train.cli`` stays as cheap as the module it names, and the lower
packages (model, data, parallel, optim, checkpoint) never import this one (tests/project/test_architecture.py).
"""
