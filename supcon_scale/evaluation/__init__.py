"""Evaluation of exported encoders: linear probe (`linear`), kNN monitor (`knn`), ImageNet-C robustness (`robustness`).

Submodules are imported on use so `import supcon_scale` stays light.
"""
