"""supcon_scale.losses"""
