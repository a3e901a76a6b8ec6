"""supcon_scale.engines"""
