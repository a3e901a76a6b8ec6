"""supcon_scale.evaluation"""
