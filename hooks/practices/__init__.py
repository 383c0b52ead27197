"""The large-batch practices: learning-rate schedules (`schedules`) and the published
recipes as data (`recipes`, Keras-free), LARS, weight-decay scaling, snapshot ensembles, time
to accuracy, and SGD/Adam with their update fused into one kernel (`fused_optimizers`).
"""
