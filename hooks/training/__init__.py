"""The training loop and its parts: `runner.run` (the skeleton every task shares),
`loop.train` (Keras fit on a DistributedTrainer), the Keras callbacks it runs, exact
distributed evaluation, and run lengths in steps (`steps`, cheap to import).
"""
